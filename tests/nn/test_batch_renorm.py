"""BatchRenorm: the formulas, BN equivalence at r_max=1/d_max=0, the ramp, state.

Error model (tests/numerics.py): the layer, nn.BatchNorm and the naive reference compute the same
float64 numbers in other orders, so they agree per tensor, norm-wise, within
``ONE_PASS_GROWTH * steps * eps(float64)`` after ``steps`` chained steps. Equality only where the
same kernels run on the same inputs (eval through BN's native path, a resumed layer).
"""

import copy

import pytest
import torch
from torch import nn

from mbn.nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from nn_reference import batch_renorm_reference
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C = 3


def close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int, what: str = "") -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * steps * eps`` of ``expected``, norm-wise."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=steps, growth=ONE_PASS_GROWTH, what=what)


def make_pair(cls, bn_cls, **kwargs):
    brn = cls(C, **kwargs).double()
    bn = bn_cls(C).double()
    gen = torch.Generator().manual_seed(0)
    running_mean = torch.randn(C, generator=gen, dtype=torch.float64)
    running_var = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2
    with torch.no_grad():
        for layer in (brn, bn):
            layer.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=torch.float64))
            layer.bias.copy_(torch.linspace(-1, 1, C, dtype=torch.float64))
            layer.running_mean.copy_(running_mean)
            layer.running_var.copy_(running_var)
    return brn, bn


@pytest.mark.parametrize(
    "cls, bn_cls, shape",
    [(BatchRenorm1d, nn.BatchNorm1d, (8, C)), (BatchRenorm2d, nn.BatchNorm2d, (4, C, 3, 3)), (BatchRenorm3d, nn.BatchNorm3d, (2, C, 2, 2, 3))],
    ids=["1d", "2d", "3d"],
)
def test_limits_one_and_zero_equal_batchnorm(cls, bn_cls, shape):
    brn, bn = make_pair(cls, bn_cls, r_max=1.0, d_max=0.0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).requires_grad_()
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        y, y_bn = brn(x), bn(x)
        close(y, y_bn, steps=step, what="output")
        for a, e in zip(torch.autograd.grad(y, (x, brn.weight, brn.bias), g), torch.autograd.grad(y_bn, (x, bn.weight, bn.bias), g)):
            close(a, e, steps=step, what="gradient")
    for key in ("running_mean", "running_var"):
        close(getattr(brn, key), getattr(bn, key), steps=3, what=key)
    assert torch.equal(brn.num_batches_tracked, bn.num_batches_tracked)
    brn.eval()
    bn.eval()
    torch.testing.assert_close(brn(x), bn(x), rtol=0, atol=0)


def test_matches_formulas_with_active_clipping():
    brn, _ = make_pair(BatchRenorm2d, nn.BatchNorm2d, r_max=1.5, d_max=0.5, r_max_ramp_steps=0, d_max_ramp_steps=0)
    gen = torch.Generator().manual_seed(2)
    # Batch statistics far from the running ones, so both r and d clip on some channels.
    x = (torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64).view(1, C, 1, 1) + 2).requires_grad_()
    g = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64)
    weight = brn.weight.detach().clone().requires_grad_()
    bias = brn.bias.detach().clone().requires_grad_()
    with torch.no_grad():  # make sure the test exercises both clips
        sigma = torch.sqrt(brn.running_var + brn.eps)
        r_raw = torch.sqrt(x.var((0, 2, 3), unbiased=False) + brn.eps) / sigma
        d_raw = (x.mean((0, 2, 3)) - brn.running_mean) / sigma
    assert ((r_raw > 1.5) | (r_raw < 1 / 1.5)).any() and ((r_raw < 1.5) & (r_raw > 1 / 1.5)).any()
    assert (d_raw.abs() > 0.5).any()
    expected = batch_renorm_reference(x, weight, bias, brn.running_mean.clone(), brn.running_var.clone(), 1.5, 0.5, brn.eps)
    y = brn(x)
    close(y, expected, steps=1, what="output")
    for a, e in zip(torch.autograd.grad(y, (x, brn.weight, brn.bias), g), torch.autograd.grad(expected, (x, weight, bias), g)):
        close(a, e, steps=1, what="gradient")


def test_running_stats_update_like_batchnorm():
    brn, bn = make_pair(BatchRenorm2d, nn.BatchNorm2d, momentum=0.3, r_max=3.0, d_max=5.0, r_max_ramp_steps=0, d_max_ramp_steps=0)
    bn.momentum = 0.3
    x = torch.randn(4, C, 3, 3, dtype=torch.float64)
    brn(x)
    bn(x)
    close(brn.running_mean, bn.running_mean, steps=1, what="running_mean")
    close(brn.running_var, bn.running_var, steps=1, what="running_var")


def test_limits_ramp():
    layer = BatchRenorm2d(C, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_ramp_steps=20, d_max_ramp_steps=10)
    assert layer.limits(0) == (1.0, 0.0)
    assert layer.limits(9) == (1.0, 0.0)
    assert layer.limits(10) == (1.0, 0.0)
    assert layer.limits(15) == pytest.approx((1.5, 2.5))
    assert layer.limits(20) == pytest.approx((2.0, 5.0))
    assert layer.limits(30) == pytest.approx((3.0, 5.0))
    assert layer.limits(10_000) == pytest.approx((3.0, 5.0))


def test_ramp_follows_num_batches_tracked_across_a_resume():
    layer = BatchRenorm2d(C, r_max_ramp_steps=4, d_max_ramp_steps=4)
    for _ in range(3):
        layer(torch.randn(2, C, 2, 2))
    resumed = BatchRenorm2d(C, r_max_ramp_steps=4, d_max_ramp_steps=4)
    resumed.load_state_dict(copy.deepcopy(layer.state_dict()), strict=True)
    x = torch.randn(2, C, 2, 2) * 4 + 3
    assert torch.equal(layer(x), resumed(x))
    assert int(resumed.num_batches_tracked) == 4


def test_validation():
    for kwargs, match in (({"r_max": 0.5}, "r_max"), ({"d_max": -1.0}, "d_max"), ({"momentum": 2.0}, "momentum"), ({"warmup_steps": -1}, "warmup_steps")):
        with pytest.raises(ValueError, match=match):
            BatchRenorm2d(C, **kwargs)
    with pytest.raises(ValueError, match="4D"):
        BatchRenorm2d(C)(torch.randn(2, C))
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm1d(C)(torch.randn(1, C))
