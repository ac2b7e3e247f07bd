"""StackedConv2d's two paths (one grouped convolution, or one dense convolution per member) compute
each member's convolution; the path is a per-layer choice that changes no parameter.

Error model (tests/numerics.py): the two paths run different float64 kernels over the same products,
so they round differently in the last bits: compared norm-wise within ``growth * eps(float64)`` with
growth 1e3 (an output here sums at most 36 products, each rounding once).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbn.models import set_conv_paths, stack, stacked_modules
from mbn.models.stacked_layers import StackedCenteredConv2d, StackedConv2d
from mbn.nn import CenteredConv2d
from numerics import assert_close_normwise

K = 3


OPTIONS = [
    {"padding": 1, "bias": False},
    {"padding": 1, "bias": True, "groups": 2, "stride": 2},
    {"padding": 1, "bias": True, "padding_mode": "reflect", "dilation": 1},
    {"padding": "same", "bias": True, "padding_mode": "circular", "dilation": 2},
    {"padding": "valid", "bias": False, "padding_mode": "replicate"},
]
# MABN's centered convolutions (zero padding only) compute with their centered weight on both paths.
CASES = [(nn.Conv2d, StackedConv2d, options) for options in OPTIONS] + [
    (CenteredConv2d, StackedCenteredConv2d, options) for options in OPTIONS if options.get("padding_mode", "zeros") == "zeros"]


@pytest.mark.parametrize("conv, stacked_conv, options", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_dense_and_grouped_paths_give_the_same_outputs_and_gradients(conv, stacked_conv, options):
    torch.manual_seed(0)
    members = [conv(4, 6, 3, **options).double() for _ in range(K)]
    layer = stacked_conv.from_members(members)
    x = torch.randn(2, K * 4, 7, 7, dtype=torch.float64)
    results = {}
    for path in ("grouped", "dense"):
        layer.path = path
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        output = layer(inputs)
        (output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).view_as(output)).sum().backward()
        results[path] = (output, inputs.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad)
    for what, dense, grouped in zip(("output", "input grad", "weight grad", "bias grad"), results["dense"], results["grouped"]):
        if grouped is not None:
            assert_close_normwise(dense, grouped, dtype=torch.float64, steps=1, growth=1e3, what=what)
    # And each member's block is that member's own convolution.
    for k, member in enumerate(members):
        assert_close_normwise(results["dense"][0][:, k * 6:(k + 1) * 6], member(x[:, k * 4:(k + 1) * 4]),
                              dtype=torch.float64, steps=1, growth=1e3, what=f"member {k} output")


def test_set_conv_paths_sets_named_layers_and_refuses_unknown_names_and_paths():
    models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)) for _ in range(2)]
    stacked = stack(models)
    set_conv_paths(stacked, {"2": "dense"})
    assert [layer.path for _, layer in stacked_modules(stacked)] == ["grouped", "dense"]
    set_conv_paths(stacked, "dense")
    assert [layer.path for _, layer in stacked_modules(stacked)] == ["dense", "dense"]
    assert "path=dense" in repr(stacked)
    with pytest.raises(ValueError, match="no stacked convolution named '1'"):
        set_conv_paths(stacked, {"1": "dense"})
    with pytest.raises(ValueError, match="path must be one of grouped, dense, got 'fast'"):
        set_conv_paths(stacked, "fast")
