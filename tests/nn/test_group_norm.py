"""GroupNorm: channel count first, num_groups or group_size, clear divisibility errors."""

import pytest
import torch
from torch import nn

from mbn.nn import GroupNorm


def test_matches_torch_groupnorm():
    torch.manual_seed(0)
    ours = GroupNorm(32, num_groups=8)
    reference = nn.GroupNorm(8, 32)
    with torch.no_grad():
        ours.weight.uniform_()
        ours.bias.uniform_()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(ours(x), reference(x))


def test_default_and_group_size():
    assert GroupNorm(64).num_groups == 32
    assert GroupNorm(64, group_size=16).num_groups == 4
    assert GroupNorm(16, num_groups=16).num_groups == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_channels": 16}, r"GroupNorm\(16\): 16 channels are not divisible into num_groups=32"),
        ({"num_channels": 24, "group_size": 16}, r"GroupNorm\(24\): 24 channels are not divisible by group_size=16"),
        ({"num_channels": 32, "num_groups": 4, "group_size": 8}, "not both"),
        ({"num_channels": 32, "num_groups": 0}, "num_groups"),
        ({"num_channels": 32, "group_size": 0}, "group_size"),
        ({"num_channels": 0}, "num_channels"),
    ],
)
def test_errors_name_the_layer_and_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupNorm(**kwargs)
