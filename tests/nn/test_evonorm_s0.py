"""EvoNorm-S0 against a float64 reference written from Liu et al. (2020), Table 1; groups, eval, state.

Error model (tests/numerics.py): the layer and the reference compute the same float64 numbers in
other orders (a fused group variance against explicit per-group sums), so outputs and gradients
agree per tensor, norm-wise, within ``ONE_PASS_GROWTH * eps(float64)`` (one pass). Equality only
where the same code runs on the same inputs (train against eval mode, a reloaded layer).
"""

from __future__ import annotations

import pytest
import torch

from mbn.nn import EvoNormS0, make_norm
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C, G = 6, 3


def close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * eps`` of ``expected``, norm-wise (one pass)."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH, what=what)


def per_channel(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (rank - 2)))


def evonorm_s0_reference(x, v, weight, bias, groups, eps):
    """EvoNorm-S0, naively: y = x * sigmoid(v x) / sqrt(s2_g + eps) * gamma + beta, with s2_g the mean
    of squared deviations over each sample's group of C / G consecutive channels and all positions."""
    rank = x.dim()
    per_group = x.shape[1] // groups
    stds = []
    for g in range(groups):
        block = x[:, g * per_group:(g + 1) * per_group]
        dims = list(range(1, rank))
        count = block[0].numel()
        mean = block.sum(dims, keepdim=True) / count
        s2 = ((block - mean) ** 2).sum(dims, keepdim=True) / count
        stds.append(torch.sqrt(s2 + eps).expand_as(block))
    group_std = torch.cat(stds, 1)
    gate = 1 / (1 + torch.exp(-per_channel(v, rank) * x))
    return x * gate / group_std * per_channel(weight, rank) + per_channel(bias, rank)


def make_layer(**kwargs) -> EvoNormS0:
    layer = EvoNormS0(C, **{"num_groups": G, **kwargs}).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.v.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    return layer


def leaf_parameters(layer: EvoNormS0) -> list[torch.Tensor]:
    return [getattr(layer, name).detach().clone().requires_grad_() for name in ("v", "weight", "bias")]


@pytest.mark.parametrize("shape", [(4, C), (2, C, 5), (2, C, 3, 3), (2, C, 2, 2, 3)], ids=["1d", "1d-seq", "2d", "3d"])
def test_matches_the_reference_output_and_gradients(shape):
    layer = make_layer()
    v, weight, bias = leaf_parameters(layer)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    expected = evonorm_s0_reference(x, v, weight, bias, G, layer.eps)
    close(y, expected, "output")
    actual_grads = torch.autograd.grad(y, (x, layer.v, layer.weight, layer.bias), g)
    for name, a, e in zip(("x", "v", "weight", "bias"), actual_grads, torch.autograd.grad(expected, (x, v, weight, bias), g)):
        close(a, e, f"gradient of {name}")


def test_batch_independent_and_identical_in_train_and_eval():
    layer = make_layer()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64)
    train_output = layer(x)
    assert torch.equal(layer(x[:1]), train_output[:1])  # each sample alone gives the same numbers
    layer.eval()
    assert torch.equal(layer(x), train_output)
    assert list(layer.buffers()) == []


def test_gradcheck():
    layer = make_layer()
    x = torch.randn(2, C, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)

    def forward(x, v, weight, bias):
        return torch.func.functional_call(layer, {"v": v, "weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(forward, (x, *leaf_parameters(layer)))


def test_state_dict_round_trip():
    layer = make_layer()
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "v"]
    fresh = EvoNormS0(C, num_groups=G).double()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    assert torch.equal(fresh(x), layer(x))


def test_groups_as_groupnorm_defaults_factory_and_errors():
    assert EvoNormS0(64).num_groups == 32  # GroupNorm's default
    assert EvoNormS0(16, group_size=4).num_groups == 4
    layer = make_norm("evonorm_s0", 8, num_groups=2)
    assert type(layer) is EvoNormS0 and layer.eps == 1e-5
    assert torch.equal(layer.v, torch.ones(8)) and torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    with pytest.raises(ValueError, match=r"EvoNormS0\(16\): 16 channels are not divisible into num_groups=32"):
        EvoNormS0(16)
    with pytest.raises(ValueError, match="not both"):
        EvoNormS0(16, num_groups=4, group_size=4)
    with pytest.raises(ValueError, match="eps"):
        EvoNormS0(8, num_groups=2, eps=-1.0)
    with pytest.raises(ValueError, match=r"EvoNormS0\(8\): expected input of shape \(N, 8, ...\)"):
        layer(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("shape", [(4, C), (2, C, 3, 3)], ids=["1d", "2d"])
def test_without_activation_is_the_affine_map_of_timm_and_the_reference_code(shape):
    """apply_act=False: y = x * weight + bias (timm's EvoNorm2dS0 and the authors' nonlinearity=False),
    with no v."""
    layer = make_layer()
    layer.apply_act = False
    assert layer.v is None and list(layer.state_dict()) == ["weight", "bias"]
    weight, bias = (getattr(layer, name).detach().clone().requires_grad_() for name in ("weight", "bias"))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    expected = x * per_channel(weight, x.dim()) + per_channel(bias, x.dim())
    close(y, expected, "output")
    actual_grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    for name, a, e in zip(("x", "weight", "bias"), actual_grads, torch.autograd.grad(expected, (x, weight, bias), g)):
        close(a, e, f"gradient of {name}")
    assert "apply_act=False" in repr(layer)
    built = EvoNormS0(C, num_groups=G, apply_act=False)
    assert not built.apply_act and [name for name, _ in built.named_parameters()] == ["weight", "bias"]
