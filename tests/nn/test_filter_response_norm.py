"""FRN + TLU against a float64 reference written from Singh & Krishnan (2020), Eqs. 1-4; eval, state.

Error model (tests/numerics.py): the layer and the reference compute the same float64 numbers in
other orders (rsqrt of a fused mean against sqrt of an explicit sum), so outputs and gradients agree
per tensor, norm-wise, within ``ONE_PASS_GROWTH * eps(float64)`` (one pass). Equality only where the
same code runs on the same inputs (train against eval mode, a reloaded layer).
"""

from __future__ import annotations

import pytest
import torch

from mbn.nn import FilterResponseNorm, make_norm
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C = 3


def close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", scale: float = 0.0) -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * eps`` of ``expected``, norm-wise (one pass), relative
    to ``max(||expected||, scale)``."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH, scale=scale, what=what)


def per_channel(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (rank - 2)))


def frn_tlu_reference(x, weight, bias, tau, eps):
    """Eq. 1: nu2 = sum_i x_i^2 / N over each sample's channel (N = its positions); Eq. 2:
    x_hat = x / sqrt(nu2 + eps); Eq. 3: y = gamma x_hat + beta; Eq. 4: z = max(y, tau)."""
    rank = x.dim()
    positions = x[0, 0].numel()
    nu2 = (x * x).sum(list(range(2, rank)), keepdim=True) / positions if rank > 2 else x * x
    x_hat = x / torch.sqrt(nu2 + eps)
    y = per_channel(weight, rank) * x_hat + per_channel(bias, rank)
    return torch.maximum(y, per_channel(tau, rank))


def make_layer(eps: float = 1e-6) -> FilterResponseNorm:
    layer = FilterResponseNorm(C, eps=eps).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64) * 0.5)
        layer.tau.copy_(torch.randn(C, generator=gen, dtype=torch.float64) * 0.5)
    return layer


def leaf_parameters(layer: FilterResponseNorm) -> list[torch.Tensor]:
    return [getattr(layer, name).detach().clone().requires_grad_() for name in ("weight", "bias", "tau")]


@pytest.mark.parametrize("shape", [(4, C), (2, C, 5), (2, C, 3, 3), (2, C, 2, 2, 3)], ids=["1d", "1d-seq", "2d", "3d"])
def test_matches_the_reference_output_and_gradients(shape):
    layer = make_layer()
    weight, bias, tau = leaf_parameters(layer)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    expected = frn_tlu_reference(x, weight, bias, tau, layer.eps)
    assert (expected == per_channel(tau, x.dim())).any() and (expected > per_channel(tau, x.dim())).any()  # TLU on both sides
    close(y, expected, "output")
    actual_grads = torch.autograd.grad(y, (x, layer.weight, layer.bias, layer.tau), g)
    # x's gradient is g * gamma / sqrt(nu2 + eps) minus the part through nu2, two terms that cancel to
    # about eps / nu2 of their size where a channel has one position ((N, C) inputs: x_hat = x / |x|
    # but for eps); its rounding error is relative to the size of those terms.
    with torch.no_grad():
        spatial = list(range(2, x.dim()))
        nu2 = (x * x).mean(spatial, keepdim=True) if spatial else x * x
        term_size = torch.linalg.vector_norm(g * per_channel(weight, x.dim()) / torch.sqrt(nu2 + layer.eps)).item()
    expected_grads = torch.autograd.grad(expected, (x, weight, bias, tau), g)
    for name, a, e in zip(("x", "weight", "bias", "tau"), actual_grads, expected_grads):
        close(a, e, f"gradient of {name}", scale=term_size if name == "x" else 0.0)


def test_batch_independent_and_identical_in_train_and_eval():
    layer = make_layer()
    x = torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    train_output = layer(x)
    assert torch.equal(layer(x[:1]), train_output[:1])
    layer.eval()
    assert torch.equal(layer(x), train_output)
    assert list(layer.buffers()) == []


def test_gradcheck():
    layer = make_layer(eps=1e-3)  # a larger eps keeps the finite differences well conditioned
    x = torch.randn(2, C, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)

    def forward(x, weight, bias, tau):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias, "tau": tau}, (x,))

    assert torch.autograd.gradcheck(forward, (x, *leaf_parameters(layer)))


def test_state_dict_round_trip():
    layer = make_layer()
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "tau"]
    fresh = FilterResponseNorm(C).double()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    assert torch.equal(fresh(x), layer(x))


def test_defaults_factory_and_errors():
    layer = make_norm("frn", 4)
    assert type(layer) is FilterResponseNorm and layer.eps == 1e-6
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4)) and torch.equal(layer.tau, torch.zeros(4))
    with pytest.raises(ValueError, match=r"FilterResponseNorm\(4\): expected input of shape \(N, 4, ...\)"):
        layer(torch.randn(2, 3, 2, 2))
    for kwargs, match in (({"eps": -1.0}, "eps"), ({"num_features": 0}, "num_features")):
        with pytest.raises(ValueError, match=match):
            FilterResponseNorm(**{"num_features": 4, **kwargs})


@pytest.mark.parametrize("shape", [(2, C, 5), (2, C, 3, 3)], ids=["1d-seq", "2d"])
def test_without_activation_is_frn_without_tlu(shape):
    """apply_act=False: y = gamma x_hat + beta (Eqs. 1-3; timm's FilterResponseNormTlu2d with
    apply_act=False), with no tau."""
    layer = make_layer()
    weight, bias, tau = leaf_parameters(layer)
    layer.apply_act = False
    assert layer.tau is None and list(layer.state_dict()) == ["weight", "bias"]
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    # Without TLU the reference's Eq. 3 output: the reference with tau = -inf.
    expected = frn_tlu_reference(x, weight, bias, torch.full_like(tau, -torch.inf), layer.eps)
    assert (expected < per_channel(tau, x.dim())).any()  # outputs TLU would have clipped
    close(y, expected, "output")
    actual_grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    for name, a, e in zip(("x", "weight", "bias"), actual_grads, torch.autograd.grad(expected, (x, weight, bias), g)):
        close(a, e, f"gradient of {name}")
    assert "apply_act=False" in repr(layer)
    built = FilterResponseNorm(C, apply_act=False)
    assert not built.apply_act and [name for name, _ in built.named_parameters()] == ["weight", "bias"]
