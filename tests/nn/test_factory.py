"""make_norm / norm_layer: names, keyword checking, the backbone norm_layer convention."""

import pickle

import pytest
import torch
from torch import nn

from mbn.nn import (
    NORM_NAMES,
    BatchRenorm2d,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GroupNorm,
    MomentumBatchNorm2d,
    make_norm,
    norm_class,
    norm_layer,
)


def test_names():
    assert NORM_NAMES == ("bn", "gn", "brn", "mbn", "evonorm_b0", "evonorm_s0", "frn", "mabn", "cbn", "none")


@pytest.mark.parametrize(
    "name, kwargs, cls",
    [
        ("bn", {}, nn.BatchNorm2d),
        ("gn", {"num_groups": 8}, GroupNorm),
        ("brn", {"r_max": 2.0}, BatchRenorm2d),
        ("mbn", {"ideal_batch_size": 8}, MomentumBatchNorm2d),
        ("none", {}, nn.Identity),
        ("evonorm_b0", {"momentum": 0.2}, EvoNormB0),
        ("evonorm_s0", {"num_groups": 4}, EvoNormS0),
        ("frn", {"eps": 1e-5}, FilterResponseNorm),
    ],
)
def test_make_norm_builds_working_layers(name, kwargs, cls):
    layer = make_norm(name, 16, **kwargs)
    assert type(layer) is cls
    x = torch.randn(2, 16, 3, 3)
    assert layer(x).shape == x.shape
    factory = norm_layer(name, **kwargs)
    assert type(factory(16)) is cls
    assert type(pickle.loads(pickle.dumps(factory))(16)) is cls  # survives multiprocessing/Hydra


def test_kwargs_reach_the_layer():
    layer = norm_layer("mbn", ideal_batch_size=8, tau0=0.5, schedule="fixed", fixed_lam=0.25, eps=1e-3)(4)
    assert (layer.ideal_batch_size, layer.tau0, layer.schedule, layer.fixed_lam, layer.eps) == (8, 0.5, "fixed", 0.25, 1e-3)
    assert norm_layer("gn", group_size=4)(16).num_groups == 4
    brn = make_norm("brn", 4, r_max=2.0, d_max=1.0, warmup_steps=3, r_max_ramp_steps=7, d_max_ramp_steps=9, momentum=0.2)
    assert (brn.r_max, brn.d_max, brn.warmup_steps, brn.r_max_ramp_steps, brn.d_max_ramp_steps, brn.momentum) == (2.0, 1.0, 3, 7, 9, 0.2)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="bn, gn, brn, mbn, evonorm_b0, evonorm_s0, frn, mabn, cbn, none"):
        make_norm("batchnorm", 4)
    with pytest.raises(ValueError, match="'layernorm'"):
        norm_layer("layernorm")


@pytest.mark.parametrize("name, kwargs", [("mbn", {"idealbatch_size": 8}), ("gn", {"groups": 8}), ("bn", {"ideal_batch_size": 8}), ("none", {"eps": 1e-5})])
def test_unaccepted_kwarg_names_norm_and_kwarg(name, kwargs):
    (bad,) = kwargs
    with pytest.raises(TypeError, match=rf"norm '{name}'.*'{bad}'"):
        norm_layer(name, **kwargs)  # fails before any model is built
    with pytest.raises(TypeError, match=bad):
        make_norm(name, 8, **kwargs)


def test_norm_class_dims():
    assert norm_class("bn", 1) is nn.BatchNorm1d
    assert norm_class("mbn", 3).__name__ == "MomentumBatchNorm3d"
    with pytest.raises(ValueError, match="dim"):
        norm_class("bn", 4)
