"""CrossIterationBatchNorm (CBN, Yao et al., CVPR 2021): the paper's equations, burn-in, state, models.

Error model (tests/numerics.py): the layer and the naive float64 reference below compute the same
numbers in other orders (the reference takes d mu / d W and d nu / d W from the unfolded input
patches, the layer from one weight-gradient call of the convolution, or by autograd through it where
that fast path does not apply; it normalizes with native BN kernels), so each tensor agrees norm-wise within
``ONE_PASS_GROWTH * steps * eps(float64)`` after ``steps`` chained steps. Equality only where the
same kernels run on the same inputs (the burn-in, which is ``F.batch_norm``; a reloaded layer).

The gradient of CBN's output is the true gradient of the paper's estimate with the past
iterations' compensated statistics as constants (no gradient flows into past iterations, as in the
paper and the reference code): ``gradcheck`` of :func:`mbn.nn.cross_iteration_batch_norm`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn.models import build_model
from mbn.nn import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    bind_norm,
    convert_norm,
    cross_iteration_batch_norm,
    norm_layer,
)
from mbn.nn import cross_iteration_batchnorm as cbn_module
from mbn.nn.cross_iteration_batchnorm import conv2d_statistics_derivatives, cross_iteration_batch_norm_fast
from nn_reference import channel_view
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C_IN, C = 2, 3


def close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int, what: str = "") -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * steps * eps`` of ``expected``, norm-wise."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=steps, growth=ONE_PASS_GROWTH, what=what)


class CBNReference:
    """CBN from the paper (Eq. 5-9) for a 3x3, padding-1 convolution without bias in front.

    The convolution's output channel c at a position is ``W[c] . p`` for the input patch ``p``, so
    ``mu_c = mean(W[c] . p)``, ``d mu_c / d W[c] = mean(p)``, ``nu_c = mean((W[c] . p)^2)``,
    ``d nu_c / d W[c] = 2 mean((W[c] . p) p)``. A past iteration's statistics under the current weights:
    ``mu(W_t) = mu + <d mu / d W, W_t - W_past>`` per channel, same for nu; pooled with the current
    ones: ``mean = avg(mu)``, ``var = avg(max(nu, mu^2)) - mean^2``; plain BN in the burn-in.
    Running statistics: the current batch's mean and unbiased variance, momentum m.
    """

    def __init__(self, window, burnin, momentum, eps):
        self.window, self.burnin, self.momentum, self.eps = window, burnin, momentum, eps
        self.past: list[tuple[torch.Tensor, ...]] = []  # (mu, nu, dmu, dnu, W), newest last
        self.running_mean = torch.zeros(C, dtype=torch.float64)
        self.running_var = torch.ones(C, dtype=torch.float64)
        self.step = 0

    def forward(self, images, conv_weight, gamma, beta):
        patches = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, C_IN * 9)  # (N*L, C_in*9)
        w = conv_weight.reshape(C, -1)
        y = patches @ w.T  # (N*L, C): the convolution's output
        mu, nu = y.mean(0), (y * y).mean(0)
        n = y.shape[0]
        with torch.no_grad():
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mu
            self.running_var = (1 - self.momentum) * self.running_var + self.momentum * y.var(0)  # unbiased
        mus, nus = [mu], [nu]
        if self.step >= self.burnin:
            for mu_j, nu_j, dmu_j, dnu_j, w_j in self.past:
                change = (w.detach() - w_j)
                mus.append(mu_j + (dmu_j * change).sum(1))
                nus.append(nu_j + (dnu_j * change).sum(1))
            dmu = patches.mean(0).expand(C, -1)
            dnu = 2 * (y.detach().T @ patches) / n
            self.past = (self.past + [(mu.detach(), nu.detach(), dmu, dnu, w.detach().clone())])[-(self.window - 1):] if self.window > 1 else []
        mean = torch.stack(mus).mean(0)
        var = torch.maximum(torch.stack(nus), torch.stack(mus) ** 2).mean(0) - mean ** 2
        out = (y - mean) / torch.sqrt(var + self.eps) * gamma + beta  # (N*L, C)
        self.step += 1
        batch, _, h, wd = images.shape
        return out.reshape(batch, h, wd, C).permute(0, 3, 1, 2)


def make_pair(window=3, burnin=2, momentum=0.3):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(C_IN, C, 3, padding=1, bias=False).double()
    norm = CrossIterationBatchNorm2d(C, window=window, burnin_steps=burnin, momentum=momentum).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        norm.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=torch.float64))
        norm.bias.copy_(torch.linspace(-1, 1, C, dtype=torch.float64))
    assert bind_norm(conv, norm) is conv
    return conv, norm, CBNReference(window, burnin, momentum, norm.eps)


def test_matches_the_paper_over_steps_with_changing_weights_and_batch_sizes():
    """Output, gradients (input, conv weight, gamma, beta) and running statistics over 8 steps:
    2 of burn-in, the window filling, then full; the conv weight moves by an SGD step each time."""
    conv, norm, ref = make_pair()
    gen = torch.Generator().manual_seed(1)
    for step, batch in enumerate([2, 3, 2, 4, 1, 2, 3, 2], 1):
        images = (torch.randn(batch, C_IN, 3, 4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        w_ref = conv.weight.detach().clone().requires_grad_()
        gamma, beta = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
        out = norm(conv(images))
        out_ref = ref.forward(images, w_ref, gamma, beta)
        close(out, out_ref, steps=step, what=f"output at step {step}")
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(out, (images, conv.weight, norm.weight, norm.bias), g)
        grads_ref = torch.autograd.grad(out_ref, (images, w_ref, gamma, beta), g)
        for name, a, e in zip(("images", "conv weight", "gamma", "beta"), grads, grads_ref):
            close(a, e, steps=step, what=f"gradient of {name} at step {step}")
        close(norm.running_mean, ref.running_mean, steps=step, what="running_mean")
        close(norm.running_var, ref.running_var, steps=step, what="running_var")
        with torch.no_grad():  # an SGD step on the convolution, which the next steps compensate for
            conv.weight.sub_(0.1 * grads[1])
    assert int(norm.num_batches_tracked) == 8 and len(ref.past) == 2


def test_the_mean_compensation_is_exact():
    """mu is linear in the conv weight, so a past batch's compensated mean is its mean under the
    current weights (one pass each: float64 rounding only)."""
    conv, norm, _ = make_pair(window=2, burnin=0)
    gen = torch.Generator().manual_seed(2)
    old_images = torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64)
    norm(conv(old_images)).sum().backward()
    with torch.no_grad():
        conv.weight.add_(0.3 * torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    change = conv.weight.detach() - norm.past_weight[:, 0]
    compensated = norm.past_mean[:, 0] + (norm.past_dmean[:, 0] * change).sum((1, 2, 3))
    close(compensated, conv(old_images).mean((0, 2, 3)).detach(), steps=1, what="compensated mean")


def test_gradient_is_the_true_gradient_of_the_estimate():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, C, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    past_mean = torch.randn(2, C, generator=gen, dtype=torch.float64)
    past_sq = past_mean ** 2 + torch.tensor([[0.5, -0.2, 1.0], [0.1, 0.3, -0.4]], dtype=torch.float64)  # some below mu^2
    weight = torch.rand(C, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    bias = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: cross_iteration_batch_norm(x, past_mean, past_sq, w, b, 1e-5), (x, weight, bias))


@pytest.mark.parametrize("shape, affine, past", [((2, C, 2, 3), True, 2), ((5, C), False, 3), ((3, C, 4), True, 0)],
                         ids=["2d, 2 past", "1d without affine, 3 past", "no past"])
def test_the_fast_path_is_the_definition(shape, affine, past):
    """Output, gradients (input, weight, bias), the batch's statistics and the running statistics of
    the two-native-pass path against :func:`cross_iteration_batch_norm` and nn.BatchNorm's update
    (the same sums in another order: ONE_PASS_GROWTH * eps); some past second moments below the
    squared mean (the paper's max)."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    past_mean = torch.randn(past, C, generator=gen, dtype=torch.float64)
    past_sq = past_mean ** 2 + torch.rand(past, C, generator=gen, dtype=torch.float64) - 0.3
    weight = torch.rand(C, generator=gen, dtype=torch.float64).add(0.5).requires_grad_() if affine else None
    bias = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    running = (torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64))
    output, mean, sq = cross_iteration_batch_norm_fast(x, past_mean, past_sq, weight, bias, 1e-5, *running, momentum=0.3)
    expected = cross_iteration_batch_norm(x, past_mean, past_sq, weight, bias, 1e-5)
    close(output, expected, steps=1, what="output")
    dims = [0, *range(2, x.dim())]
    close(mean, x.detach().mean(dims), steps=1, what="batch mean")
    close(sq, x.detach().square().mean(dims), steps=1, what="batch second moment")
    bn_mean, bn_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    F.batch_norm(x.detach(), bn_mean, bn_var, training=True, momentum=0.3)
    close(running[0], bn_mean, steps=1, what="running_mean")
    close(running[1], bn_var, steps=1, what="running_var")
    g = torch.randn(output.shape, generator=gen, dtype=torch.float64)
    inputs = [t for t in (x, weight, bias) if t is not None]
    for name, actual, wanted in zip(("input", "weight", "bias"), torch.autograd.grad(output, inputs, g), torch.autograd.grad(expected, inputs, g)):
        close(actual, wanted, steps=1, what=f"gradient of {name}")
    assert torch.autograd.gradcheck(lambda x, *affine: cross_iteration_batch_norm_fast(x, past_mean, past_sq, *(affine or (None, None)), 1e-5)[0],
                                    (x, *inputs[1:]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(cross_iteration_batch_norm_fast(x, past_mean, past_sq, weight, bias, 1e-5)[0].sum(), x, create_graph=True)


@pytest.mark.parametrize("window, burnin", [(1, 0), (4, 5)], ids=["window 1", "burn-in"])
def test_window_one_and_the_burn_in_are_batchnorm(window, burnin):
    conv, norm, _ = make_pair(window=window, burnin=burnin, momentum=0.1)
    bn = nn.BatchNorm2d(C).double()
    bn.load_state_dict(norm.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        y = conv(torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64)).detach().requires_grad_()
        out, out_bn = norm(y), bn(y)
        assert torch.equal(out, out_bn)
        assert torch.equal(torch.autograd.grad(out.square().sum(), y)[0], torch.autograd.grad(out_bn.square().sum(), y)[0])
    assert torch.equal(norm.running_mean, bn.running_mean) and torch.equal(norm.running_var, bn.running_var)


def test_eval_mode_is_batchnorm_and_convert_to_bn_is_exact():
    conv, norm, _ = make_pair(burnin=0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        norm(conv(torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64))).sum().backward()
    norm.eval()
    y = torch.randn(3, C, 3, 3, generator=gen, dtype=torch.float64)
    expected = (y - channel_view(norm.running_mean, 4)) / channel_view(torch.sqrt(norm.running_var + norm.eps), 4)
    close(norm(y), expected * channel_view(norm.weight, 4) + channel_view(norm.bias, 4), steps=1, what="eval output")
    bn = convert_norm(copy.deepcopy(norm), "bn")
    assert isinstance(bn, nn.BatchNorm2d) and torch.equal(bn(y), norm(y))


def test_state_dict_round_trip_continues_the_window():
    model = nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)).double()
    convert_norm(model, "cbn", window=3, burnin_steps=1)
    gen = torch.Generator().manual_seed(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64)).square().sum().backward()
        optimizer.step()
    assert {"1.past_mean", "1.past_sq", "1.past_weight", "1.past_dmean", "1.past_dsq"} <= set(model.state_dict())
    assert "1.weight" in model.state_dict() and not any(key.startswith("1.0") for key in model.state_dict())
    resumed = nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)).double()
    convert_norm(resumed, "cbn", window=3, burnin_steps=1)
    resumed.load_state_dict(copy.deepcopy(model.state_dict()))
    x = torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64)
    out, out_resumed = model(x), resumed(x)
    assert torch.equal(out, out_resumed)
    assert torch.equal(torch.autograd.grad(out.square().sum(), model[0].weight)[0],
                       torch.autograd.grad(out_resumed.square().sum(), resumed[0].weight)[0])


def test_needs_its_convolution():
    norm = CrossIterationBatchNorm2d(C, burnin_steps=0)
    with pytest.raises(RuntimeError, match="needs the convolution in front"):
        norm(torch.randn(2, C, 2, 2))
    with pytest.raises(ValueError, match="weight of shape"):
        bind_norm(nn.Conv2d(C_IN, C + 1, 1), norm)
    with pytest.raises(ValueError, match="needs the convolution in front"):
        convert_norm(nn.Sequential(nn.BatchNorm2d(C)), "cbn")
    conv, other = nn.Conv2d(C_IN, C, 1), nn.Conv2d(C_IN, C, 1)
    bind_norm(conv, norm)
    with pytest.raises(RuntimeError, match="does not depend on the weight"):
        norm(other(torch.randn(2, C_IN, 2, 2)))
    assert isinstance(bind_norm(nn.Linear(4, C), CrossIterationBatchNorm1d(C)), nn.Linear)


def test_backbones_hand_each_layer_its_convolution():
    model = build_model("resnet18", num_classes=3, norm_layer=norm_layer("cbn"), width=4)
    norms = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(norms) == 20 and all(norm.past_weight is not None for norm in norms)
    named = dict(model.named_modules())
    assert norms[0].past_weight.shape == (4, 3, *named["stem.0"].weight.shape[1:])  # (C, window - 1, ...)
    assert list(model.state_dict()) == list(build_model("resnet18", num_classes=3, norm_layer=norm_layer("cbn"), width=4).state_dict())
    vgg = build_model("vgg11", num_classes=3, norm_layer=norm_layer("cbn"), width=4)
    assert all(m.past_weight is not None for m in vgg.modules() if isinstance(m, CrossIterationBatchNorm2d))


@pytest.mark.parametrize("batch_size", [2, 5])
def test_a_tiny_resnet18_trains_with_finite_loss(batch_size):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, norm_layer=norm_layer("cbn", window=3, burnin_steps=2), width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        x, y = torch.randn(batch_size, 3, 8, 8), torch.randint(0, 3, (batch_size,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()


def autograd_statistics_derivatives(conv: nn.Conv2d, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: d mean_c / d W and d mean(y_c^2) / d W by autograd (one backward pass each)."""
    y = conv(images)
    dims = (0, 2, 3)
    ones = torch.ones(y.shape[1], dtype=y.dtype)
    return tuple(torch.autograd.grad(stat, conv.weight, ones, retain_graph=True)[0] for stat in (y.mean(dims), y.square().mean(dims)))


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 1, "stride": 2, "bias": True},
    {"kernel_size": (3, 1), "padding": (2, 0), "dilation": 2},
    {"kernel_size": 3, "padding": 1, "groups": 2},
    {"kernel_size": 1, "stride": 2},
], ids=["3x3", "stride 2 with bias", "dilated", "2 groups", "1x1 stride 2"])
def test_the_fast_derivatives_are_the_autograd_definitions(kwargs):
    """One weight-gradient call of the convolution against two autograd passes: the same sums in
    another order (a single pass: ONE_PASS_GROWTH * eps, tests/numerics.py)."""
    gen = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(4, 6, **{"bias": False, **kwargs}).double()
    with torch.no_grad():
        for parameter in conv.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen, dtype=torch.float64))
    images = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) + 0.5
    dmean, dsq = conv2d_statistics_derivatives(images, conv(images), conv)
    expected_dmean, expected_dsq = autograd_statistics_derivatives(conv, images)
    close(dmean, expected_dmean, steps=1, what="d mean / d W")
    close(dsq, expected_dsq, steps=1, what="d sq / d W")


def test_the_layer_takes_the_fast_path_only_for_its_convolutions_own_output(monkeypatch):
    """In front of its plain convolution each training step computes the derivatives in one call;
    when something sits between (here a scaling) or in eval mode, the autograd definition applies,
    and both give the definition's window (the compensation that follows reads it)."""
    calls = []
    fast = cbn_module.conv2d_statistics_derivatives
    monkeypatch.setattr(cbn_module, "conv2d_statistics_derivatives", lambda *args, **kwargs: calls.append(1) or fast(*args, **kwargs))
    gen = torch.Generator().manual_seed(8)
    images = [torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    conv, norm, _ = make_pair(window=4, burnin=0)
    for x in images:
        norm(conv(x)).sum().backward()
    assert len(calls) == 3
    conv_slow, norm_slow, _ = make_pair(window=4, burnin=0)
    for x in images:
        norm_slow(conv_slow(x) * 1.0).sum().backward()  # not the convolution's output: the definition
    assert len(calls) == 3
    for name in ("past_dmean", "past_dsq", "past_mean", "past_sq", "past_weight"):
        close(getattr(norm, name), getattr(norm_slow, name), steps=3, what=name)
    norm.eval()
    with torch.no_grad():
        norm(conv(images[0]))
    assert len(calls) == 3 and "_cbn_last_io" not in conv.__dict__  # nothing recorded outside training


def test_a_deep_copy_takes_the_fast_path_on_its_own_convolution(monkeypatch):
    calls = []
    fast = cbn_module.conv2d_statistics_derivatives
    monkeypatch.setattr(cbn_module, "conv2d_statistics_derivatives", lambda *args, **kwargs: calls.append(args[2]) or fast(*args, **kwargs))
    model = nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)).double()
    convert_norm(model, "cbn", window=3, burnin_steps=0)
    copied = copy.deepcopy(model)
    assert copied[1].preceding_layer is copied[0]
    x = torch.randn(2, C_IN, 3, 3, dtype=torch.float64)
    model(x).sum().backward()
    copied(x).sum().backward()
    assert [id(conv) for conv in calls] == [id(model[0]), id(copied[0])]
    assert len(model[0]._forward_hooks) == len(copied[0]._forward_hooks) == 1
    convert_norm(copied, "cbn", window=3)  # binding the same convolution again adds no second hook
    assert len(copied[0]._forward_hooks) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype, monkeypatch):
    """Under autocast the convolution's output (the layer's input) is half; the statistics, the window
    and the normalization stay float32 as BN's, and the fast derivatives take the convolution's input
    in the half dtype it ran in. The output is the float32 layer's on the same (rounded) input: one
    rounding of the output, norm-wise within 8 eps(dtype), as MBN's autocast test."""
    calls = []
    fast = cbn_module.conv2d_statistics_derivatives
    monkeypatch.setattr(cbn_module, "conv2d_statistics_derivatives", lambda *args, **kwargs: calls.append(1) or fast(*args, **kwargs))
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    norm = CrossIterationBatchNorm2d(8, window=3, burnin_steps=0)
    bind_norm(conv, norm)
    for step in range(4):
        x = torch.randn(4, 3, 8, 8)
        reference = copy.deepcopy(norm)
        with torch.autocast("cpu", dtype=dtype):
            features = conv(x)
            y = norm(features)
        assert features.dtype == y.dtype == dtype
        y.float().square().sum().backward()
        assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(norm.weight.grad).all()
        with torch.no_grad():
            expected = reference(features.detach().float())  # not its convolution's output: the definition's derivatives
        assert_close_normwise(y.float(), expected, dtype=dtype, steps=1, growth=8, what=f"output at step {step}")
    assert len(calls) == 4
    assert {buffer.dtype for buffer in (norm.past_mean, norm.past_dmean, norm.past_dsq, norm.running_var)} == {torch.float32}
    assert all(torch.isfinite(buffer).all() for buffer in (norm.past_dmean, norm.past_dsq))


def test_validation():
    for kwargs, match in (({"window": 0}, "window"), ({"burnin_steps": -1}, "burnin_steps"), ({"momentum": 1.5}, "momentum")):
        with pytest.raises(ValueError, match=match):
            CrossIterationBatchNorm2d(C, **kwargs)
    with pytest.raises(ValueError, match="4D"):
        CrossIterationBatchNorm2d(C)(torch.randn(2, C))
