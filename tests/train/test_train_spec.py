"""Rules of the run spec that depend on more than one field or on the environment: GN's width-scaled
default groups, trainer.compile's torch floor."""

from __future__ import annotations

import re

import pytest
import torch

from mbn.nn import functional
from mbn.train import spec as specs


@pytest.mark.parametrize("width, groups", [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 1), (1, 1), (128, 64),
                                           (12, 6), (15, 5), (9, 3), (7, 1)])
def test_width_scaled_groups_keep_the_standard_networks_channels_per_group(width, groups):
    assert specs.width_scaled_gn_groups(width) == groups
    assert width % groups == 0


def test_the_run_resolves_gn_defaults_with_its_width_and_keeps_set_values():
    def run(norm: specs.GroupNormSpec, width: int) -> specs.RunSpec:
        return specs.RunSpec(data=specs.FakeDataSpec(), model=specs.ResNetSpec(name="resnet18", width=width), norm=norm)

    assert run(specs.GroupNormSpec(), 16).norm_options == {"num_groups": 8, "group_size": None, "eps": 1e-5}
    assert run(specs.GroupNormSpec(), 64).norm_options["num_groups"] == specs.DEFAULT_GN_GROUPS
    assert run(specs.GroupNormSpec(num_groups=2), 16).norm_options["num_groups"] == 2
    assert run(specs.GroupNormSpec(group_size=4), 16).norm_options == {"num_groups": None, "group_size": 4, "eps": 1e-5}
    assert run(specs.BatchNormSpec(), 16).norm_options == {"eps": 1e-5, "momentum": 0.1}
    with pytest.raises(specs.SpecError, match="norm.num_groups: 32 groups do not divide model.width=16"):
        run(specs.GroupNormSpec(num_groups=32), 16)


def test_compile_is_refused_below_the_torch_that_compiles_mbn(monkeypatch):
    assert specs.COMPILE_MIN_TORCH == functional.COMPILE_MIN_TORCH
    # The installed torch passes exactly when mbn.nn says it compiles MBN.
    try:
        specs.TrainerSpec(compile=True)
        accepted = True
    except specs.SpecError:
        accepted = False
    assert accepted == functional.compile_supported(), torch.__version__
    for version, refused in (("2.3.1", True), ("2.5.1+cu124", True), ("2.6.0", False), ("2.14.1+cu130", False), ("3.0.0", False)):
        monkeypatch.setattr(specs, "_installed_torch", lambda: version)
        specs.TrainerSpec(compile=False)  # only compile asks for the newer torch
        if refused:
            with pytest.raises(specs.SpecError, match=rf"^compile: needs torch >= 2\.6 .* this is torch {re.escape(version)}: set trainer.compile=false$"):
                specs.TrainerSpec(compile=True)
        else:
            specs.TrainerSpec(compile=True)
