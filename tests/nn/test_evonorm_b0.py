"""EvoNorm-B0 against a float64 reference written from Liu et al. (2020), Table 1; running variance, eval, state.

Error model (tests/numerics.py): the layer and the reference compute the same float64 numbers in
other orders (a fused variance against explicit sums), so outputs, gradients and running variances
agree per tensor, norm-wise, within ``ONE_PASS_GROWTH * steps * eps(float64)`` after ``steps``
chained steps. Equality only where the same code runs on the same inputs (a reloaded layer).
"""

from __future__ import annotations

import pytest
import torch

from mbn.nn import EvoNormB0, make_norm
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C = 3


def close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int, what: str = "") -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * steps * eps`` of ``expected``, norm-wise."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=steps, growth=ONE_PASS_GROWTH, what=what)


def per_channel(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (rank - 2)))


def evonorm_b0_reference(x, v, weight, bias, running_var, momentum, eps, training):
    """EvoNorm-B0, naively: y = x / max(sqrt(s2_b + eps), v x + sqrt(s2_i + eps)) * gamma + beta.

    s2_b: per channel, the mean of squared deviations from the mean over (N, *spatial) in training
    (running_var in eval); s2_i: per sample and channel, the same over *spatial (0 for one value).
    Returns the output and the updated running variance (BN's rule: unbiased batch variance, momentum).
    """
    rank = x.dim()
    batch_dims = [0, *range(2, rank)]
    spatial_dims = list(range(2, rank))
    count = x.numel() // x.shape[1]
    if training:
        mean_b = x.sum(batch_dims, keepdim=True) / count
        s2_b = ((x - mean_b) ** 2).sum(batch_dims, keepdim=True) / count
        new_running_var = (1 - momentum) * running_var + momentum * s2_b.flatten() * count / (count - 1)
    else:
        s2_b = per_channel(running_var, rank)
        new_running_var = running_var
    if spatial_dims:
        positions = x[0, 0].numel()
        mean_i = x.sum(spatial_dims, keepdim=True) / positions
        s2_i = ((x - mean_i) ** 2).sum(spatial_dims, keepdim=True) / positions
    else:
        s2_i = torch.zeros_like(x)
    denominator = torch.maximum(torch.sqrt(s2_b + eps), per_channel(v, rank) * x + torch.sqrt(s2_i + eps))
    y = x / denominator * per_channel(weight, rank) + per_channel(bias, rank)
    return y, new_running_var.detach()


def make_layer(momentum: float = 0.1, eps: float = 1e-5) -> EvoNormB0:
    layer = EvoNormB0(C, momentum=momentum, eps=eps).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # parameters away from their initial values, so each one matters
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.v.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    return layer


def leaf_parameters(layer: EvoNormB0) -> list[torch.Tensor]:
    return [getattr(layer, name).detach().clone().requires_grad_() for name in ("v", "weight", "bias")]


@pytest.mark.parametrize("shape", [(8, C), (4, C, 5), (4, C, 3, 3), (2, C, 2, 2, 3)], ids=["1d", "1d-seq", "2d", "3d"])
def test_training_matches_the_reference_output_gradients_and_running_variance_over_steps(shape):
    layer = make_layer(momentum=0.3)
    v, weight, bias = leaf_parameters(layer)
    running_var = layer.running_var.clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = layer(x)
        expected, running_var = evonorm_b0_reference(x, v, weight, bias, running_var, 0.3, layer.eps, training=True)
        close(y, expected, steps=step, what=f"output of step {step}")
        actual_grads = torch.autograd.grad(y, (x, layer.v, layer.weight, layer.bias), g)
        expected_grads = torch.autograd.grad(expected, (x, v, weight, bias), g)
        for name, a, e in zip(("x", "v", "weight", "bias"), actual_grads, expected_grads):
            close(a, e, steps=step, what=f"gradient of {name} at step {step}")
        close(layer.running_var, running_var, steps=step, what=f"running_var after step {step}")


def test_both_branches_of_the_max_are_taken_and_tested():
    # The reference test above is only meaningful if both terms of the max win somewhere.
    layer = make_layer()
    x = torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        batch_std = torch.sqrt(x.var((0, 2, 3), unbiased=False) + layer.eps).view(1, C, 1, 1)
        instance_term = layer.v.view(1, C, 1, 1) * x + torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + layer.eps)
    assert (batch_std > instance_term).any() and (batch_std < instance_term).any()


def test_eval_normalizes_with_the_running_variance_and_leaves_it_alone():
    layer = make_layer()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        layer(torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64) * 3)
    layer.eval()
    running_var = layer.running_var.clone()
    v, weight, bias = leaf_parameters(layer)
    x = torch.randn(2, C, 3, 3, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(2, C, 3, 3, generator=gen, dtype=torch.float64)
    y = layer(x)
    expected, _ = evonorm_b0_reference(x, v, weight, bias, running_var, layer.momentum, layer.eps, training=False)
    close(y, expected, steps=1, what="eval output")
    for a, e in zip(torch.autograd.grad(y, (x, layer.v), g), torch.autograd.grad(expected, (x, v), g)):
        close(a, e, steps=1, what="eval gradient")
    assert torch.equal(layer.running_var, running_var)
    one = torch.randn(1, C, 3, 3, generator=gen, dtype=torch.float64)
    assert torch.equal(layer(one), layer(torch.cat([one, one]))[:1])  # per sample in eval: no batch statistics


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    layer = make_layer().train(training)
    x = torch.randn(3, C, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, w, b: _functional(layer, x, v, w, b), (x, *leaf_parameters(layer)))


def _functional(layer: EvoNormB0, x, v, weight, bias):
    # The layer's forward with the parameters as explicit inputs, for gradcheck.
    return torch.func.functional_call(layer, {"v": v, "weight": weight, "bias": bias, "running_var": layer.running_var.clone()}, (x,))


def test_state_dict_round_trip_and_loading_batchnorm_statistics():
    layer = make_layer()
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        layer(torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64))
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "v", "running_var"]
    fresh = EvoNormB0(C).double()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64)
    for mode in (True, False):
        layer.train(mode)
        fresh.train(mode)
        assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.running_var, layer.running_var)
    bn = torch.nn.BatchNorm2d(C).double()
    bn(x)
    shared = {key: value for key, value in bn.state_dict().items() if key in state}
    fresh.load_state_dict(shared, strict=False)
    assert torch.equal(fresh.running_var, bn.running_var)


def test_defaults_factory_and_errors():
    layer = make_norm("evonorm_b0", 4)
    assert type(layer) is EvoNormB0 and (layer.eps, layer.momentum) == (1e-5, 0.1)
    assert torch.equal(layer.v, torch.ones(4)) and torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))
    layer.running_var.fill_(3)
    layer.reset_running_stats()
    assert torch.equal(layer.running_var, torch.ones(4))
    with pytest.raises(ValueError, match=r"EvoNormB0\(4\): expected input of shape \(N, 4, ...\)"):
        layer(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))
    for kwargs, match in (({"momentum": 1.5}, "momentum"), ({"eps": -1.0}, "eps"), ({"num_features": 0}, "num_features")):
        with pytest.raises(ValueError, match=match):
            EvoNormB0(**{"num_features": 4, **kwargs})


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1), (4, C, 3, 3)], ids=["1d-one", "2d-one", "2d"])
def test_without_activation_is_the_affine_map_of_timm_and_the_reference_code(shape, training):
    """apply_act=False: y = x * weight + bias (timm's EvoNorm2dB0 and the authors' nonlinearity=False),
    with no v, running_var untouched and no batch statistic (so one value per channel is fine)."""
    layer = make_layer()
    layer.apply_act = False
    layer.train(training)
    assert layer.v is None and list(layer.state_dict()) == ["weight", "bias", "running_var"]
    running_var = layer.running_var.clone()
    weight, bias = (getattr(layer, name).detach().clone().requires_grad_() for name in ("weight", "bias"))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    expected = x * per_channel(weight, x.dim()) + per_channel(bias, x.dim())
    close(y, expected, steps=1, what="output")
    actual_grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    for name, a, e in zip(("x", "weight", "bias"), actual_grads, torch.autograd.grad(expected, (x, weight, bias), g)):
        close(a, e, steps=1, what=f"gradient of {name}")
    assert torch.equal(layer.running_var, running_var)
    assert "apply_act=False" in repr(layer)
    built = EvoNormB0(C, apply_act=False)
    assert not built.apply_act and [name for name, _ in built.named_parameters()] == ["weight", "bias"]
