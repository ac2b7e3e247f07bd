"""Normalization-activation layers: which norms include their activation, turning it off, and the ReLUs around them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbn.nn import NORM_NAMES, drop_activations, includes_activation, make_norm, without_activation

NORM_KWARGS = {"gn": {"num_groups": 2}, "evonorm_s0": {"num_groups": 2}}
NORM_ACTIVATIONS = {"evonorm_b0": "v", "evonorm_s0": "v", "frn": "tau"}


@pytest.mark.parametrize("name", NORM_NAMES)
def test_exactly_the_peers_include_their_activation_and_only_they_lose_it(name):
    layer = make_norm(name, 4, **NORM_KWARGS.get(name, {}))
    keys = list(layer.state_dict())
    assert includes_activation(layer) == (name in NORM_ACTIVATIONS)
    assert without_activation(layer) is layer
    if name in NORM_ACTIVATIONS:
        assert not layer.apply_act and NORM_ACTIVATIONS[name] not in dict(layer.named_parameters())
        assert list(layer.state_dict()) == [key for key in keys if key != NORM_ACTIVATIONS[name]]
        assert includes_activation(layer)  # the class still replaces a norm-ReLU pair
    else:
        assert list(layer.state_dict()) == keys


@pytest.mark.parametrize("name, initial", [("evonorm_b0", 1.0), ("evonorm_s0", 1.0), ("frn", 0.0)])
def test_turning_the_activation_back_on_gives_a_fresh_parameter_like_the_weight(name, initial):
    layer = make_norm(name, 4, **NORM_KWARGS.get(name, {})).double()
    layer.apply_act = False
    layer.apply_act = True
    parameter = getattr(layer, NORM_ACTIVATIONS[name])
    assert layer.apply_act and parameter.dtype == torch.float64 and torch.equal(parameter, torch.full((4,), initial, dtype=torch.float64))
    with pytest.raises(TypeError, match="apply_act must be a bool"):
        layer.apply_act = 0


class _Block(nn.Module):
    norms_before_addition = ("norm", "shortcut.1", "missing")

    def __init__(self, norm: nn.Module, shortcut_norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.shortcut = nn.Sequential(nn.Conv2d(4, 4, 1), shortcut_norm)


def test_drop_activations_replaces_a_relu_right_after_a_peer_in_a_sequential_and_turns_off_listed_norms():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 1), make_norm("frn", 4), nn.ReLU(),  # ReLU after a norm-activation layer: goes
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),  # after BN: stays
        make_norm("evonorm_b0", 4), nn.MaxPool2d(1), nn.ReLU(),  # not directly after it: stays
        _Block(make_norm("evonorm_s0", 4, num_groups=2), make_norm("frn", 4)),
    )
    assert drop_activations(model) is model
    assert [type(module).__name__ for module in model][:9] == [
        "Conv2d", "FilterResponseNorm", "Identity", "Conv2d", "BatchNorm2d", "ReLU", "EvoNormB0", "MaxPool2d", "ReLU"
    ]
    assert model[1].apply_act and model[6].apply_act
    assert not model[9].norm.apply_act and not model[9].shortcut[1].apply_act
    keys = list(model.state_dict())
    drop_activations(model)  # idempotent
    assert list(model.state_dict()) == keys
