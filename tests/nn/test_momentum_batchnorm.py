"""MomentumBatchNorm: exactness against nn.BatchNorm and its reference implementation, state, schedule, dtypes.

The reference (``impl="reference"``, :func:`mbn.nn.functional.momentum_batch_norm_reference`) is the
definition the fast path is tested against; the tests parametrized over ``impl`` check both against
independent results (nn.BatchNorm, hand computations).

Error model (tests/numerics.py): the fast path, the reference and nn.BatchNorm compute the same
float64 numbers in other orders (fused kernels, other reductions), so they agree per tensor,
norm-wise, to ``ONE_PASS_GROWTH * steps * eps(float64)`` after ``steps`` chained steps (the buffers
carry one step's difference into the next), ``ONE_PASS_GROWTH`` as tests/numerics.py states it. Equality (``torch.equal``) only where the same kernels run on the same inputs:
eval through the native BN path, a resumed layer against the uninterrupted one, a reload.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from numerics import ONE_PASS_GROWTH, assert_close_normwise

from mbn.nn import (
    MomentumBatchNorm,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
    convert,
    mbn_layers,
    schedule,
    set_progress,
)

pytestmark = pytest.mark.numerics

IMPLS = ["fast", "reference"]

C = 3
# (MBN class, BN class, input shape, channels_last)
CASES = [
    (MomentumBatchNorm1d, nn.BatchNorm1d, (6, C), False),
    (MomentumBatchNorm1d, nn.BatchNorm1d, (4, C, 5), False),
    (MomentumBatchNorm2d, nn.BatchNorm2d, (4, C, 5, 3), False),
    (MomentumBatchNorm2d, nn.BatchNorm2d, (4, C, 5, 3), True),
    (MomentumBatchNorm3d, nn.BatchNorm3d, (2, C, 3, 4, 2), False),
]
CASE_IDS = ["1d-NC", "1d-NCL", "2d", "2d-channels_last", "3d"]


def close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int, what: str = "") -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * steps * eps`` of ``expected``, norm-wise."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=steps, growth=ONE_PASS_GROWTH, what=what)


def randomize_affine(*layers):
    gen = torch.Generator().manual_seed(1)
    weight = torch.rand(layers[0].num_features, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(layers[0].num_features, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def reference_copy(layer):
    """The same layer (parameters, buffers, settings) running the reference implementation."""
    reference = copy.deepcopy(layer)
    reference.impl = "reference"
    return reference


def inputs(shape, steps, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x.requires_grad_())
    return xs


# -- lam = 0: exactly nn.BatchNorm ---------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mbn_cls, bn_cls, shape, channels_last", CASES, ids=CASE_IDS)
def test_lam_zero_matches_batchnorm(mbn_cls, bn_cls, shape, channels_last, impl):
    # m = m0 gives lam = 0 at every epoch and tau = tau0 = 0.9 = 1 - BN momentum.
    mbn = mbn_cls(C, ideal_batch_size=shape[0], tau0=0.9).double()
    mbn.impl = impl
    bn = bn_cls(C, momentum=0.1).double()
    randomize_affine(mbn, bn)
    set_progress(mbn, 7, 10)
    for step, x in enumerate(inputs(shape, steps=3, channels_last=channels_last), 1):
        grad = torch.randn_like(x)
        y_bn = bn(x)
        expected = torch.autograd.grad(y_bn, (x, bn.weight, bn.bias), grad)
        y = mbn(x)
        actual = torch.autograd.grad(y, (x, mbn.weight, mbn.bias), grad)
        close(y, y_bn, steps=step, what="output")
        for a, e, name in zip(actual, expected, ("x", "weight", "bias")):
            close(a, e, steps=step, what=f"grad of {name}")
    assert mbn.lam == 0.0
    close(mbn.running_mean, bn.running_mean, steps=3, what="running_mean")
    close(mbn.running_var, bn.running_var, steps=3, what="running_var")
    assert int(mbn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    mbn.eval()
    bn.eval()
    x = inputs(shape, steps=1, seed=5)[0]
    close(mbn(x), bn(x), steps=4, what="eval output")


def test_eval_is_batchnorm_with_running_stats():
    mbn = MomentumBatchNorm2d(C).double()
    bn = nn.BatchNorm2d(C).double()
    randomize_affine(mbn, bn)
    gen = torch.Generator().manual_seed(3)
    stats = {"running_mean": torch.randn(C, generator=gen, dtype=torch.float64), "running_var": torch.rand(C, generator=gen, dtype=torch.float64) + 0.1}
    for layer in (mbn, bn):
        layer.load_state_dict({**layer.state_dict(), **stats})
        layer.eval()
    x = torch.randn(2, C, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(mbn(x), bn(x), rtol=0, atol=0)
    before = {k: v.clone() for k, v in mbn.state_dict().items()}
    mbn(x)
    for key, value in mbn.state_dict().items():  # eval never touches the statistics
        assert torch.equal(value, before[key]), key


# -- 0 < lam < 1: the reference, and the reference by hand --------------------------------------------


@pytest.mark.parametrize("mbn_cls, bn_cls, shape, channels_last", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("affine", [True, False])
def test_momentum_matches_reference(mbn_cls, bn_cls, shape, channels_last, affine):
    m0 = 16
    mbn = mbn_cls(C, ideal_batch_size=m0, tau0=0.8, affine=affine).double()
    if affine:
        randomize_affine(mbn)
    ref = reference_copy(mbn)
    total_epochs = 5
    for step, x in enumerate(inputs(shape, steps=4, channels_last=channels_last)):
        epoch = step + 2  # epochs 2..5; the first step initializes M/Phi (lam = 0), then lam > 0
        set_progress(mbn, epoch, total_epochs)
        set_progress(ref, epoch, total_epochs)
        lam = schedule.lam(epoch, total_epochs, shape[0], m0)
        tau = schedule.tau(shape[0], m0, 0.8)
        assert 0 < lam < 1
        grad = torch.randn_like(x)
        y_ref = ref(x)
        wrt = (x, ref.weight, ref.bias) if affine else (x,)
        expected = torch.autograd.grad(y_ref, wrt, grad)
        y = mbn(x)
        actual = torch.autograd.grad(y, (x, mbn.weight, mbn.bias) if affine else (x,), grad)
        assert mbn.lam == pytest.approx(lam) and mbn.tau == pytest.approx(tau)
        close(y, y_ref, steps=step + 1, what="output")
        for a, e in zip(actual, expected):
            close(a, e, steps=step + 1, what="gradient")
        for name in ("momentum_mean", "momentum_var", "running_mean", "running_var"):
            close(getattr(mbn, name), getattr(ref, name), steps=step + 1, what=name)
    mbn.eval()
    ref.eval()
    x = inputs(shape, steps=1, seed=9)[0]
    close(mbn(x), ref(x), steps=5, what="eval output")


@pytest.mark.parametrize("impl", IMPLS)
def test_one_step_by_hand(impl):
    # One channel, x = (1, 3): mu = 2, var = 1. From M = 0, Phi = 1 with lam = 0.5 (eps = 0):
    # M = 1, Phi = 1, x_hat = x - M = (0, 2). With w = 2, b = 1: y = (1, 5). Jacobian of x_hat (Phi = 1):
    # d x_hat_i / d x_j = delta_ij - (1 - lam) / n - x_hat_i / 2 * (1 - lam) * 2 * (x_j - mu) / n
    #                   = ((0.75, -0.25), (0.25, 0.25)).
    # With g = (1, 2): dx = w * g @ J = (2.5, 0.5), dw = g . x_hat = 4, db = 3.
    # tau = 0.5 ** (2 / 2): running_mean = 0.5 * 0 + 0.5 * 2 = 1, running_var = 0.5 * 1 + 0.5 * 2 = 1.5.
    layer = MomentumBatchNorm1d(1, eps=0.0, ideal_batch_size=2, tau0=0.5, schedule="fixed", fixed_lam=0.5).double()
    layer.impl = impl
    layer.load_state_dict({**layer.state_dict(), "momentum_initialized": torch.tensor(True)})  # M = 0, Phi = 1
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(1.0)
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    # A few roundings of small exact numbers: within 16 eps norm-wise.
    exact = {"dtype": torch.float64, "steps": 1, "growth": 16}
    assert_close_normwise(y, [[1.0], [5.0]], **exact, what="output")
    for actual, expected in zip(grads, ([[2.5], [0.5]], [4.0], [3.0])):
        assert_close_normwise(actual, expected, **exact, what="gradient")
    for name, expected in (("momentum_mean", 1.0), ("momentum_var", 1.0), ("running_mean", 1.0), ("running_var", 1.5)):
        assert_close_normwise(getattr(layer, name), [expected], **exact, what=name)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.9])
def test_gradcheck(lam):
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=lam).double()
    gen = torch.Generator().manual_seed(4)
    layer(torch.randn(3, C, 2, 3, generator=gen, dtype=torch.float64))  # initialize M, Phi
    x = torch.randn(3, C, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)

    def step(x, weight, bias):  # a fresh copy per call: the layer updates its buffers
        return functional_call(copy.deepcopy(layer), {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(step, (x, weight, bias))


@pytest.mark.parametrize("impl", IMPLS)
def test_running_stats_are_tau_ema_of_batch_stats(impl):
    layer = MomentumBatchNorm2d(C, ideal_batch_size=8, tau0=0.5).double()
    layer.impl = impl
    set_progress(layer, 3, 4)
    tau = 0.5 ** (4 / 8)  # m = 4
    running_mean, running_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for x in inputs((4, C, 3, 3), steps=5):
        layer(x)
        flat = x.detach().transpose(0, 1).reshape(C, -1)
        running_mean = tau * running_mean + (1 - tau) * flat.mean(1)
        running_var = tau * running_var + (1 - tau) * flat.var(1, unbiased=True)
    close(layer.running_mean, running_mean, steps=5, what="running_mean")
    close(layer.running_var, running_var, steps=5, what="running_var")
    assert layer.tau == pytest.approx(tau)


@pytest.mark.parametrize("impl", IMPLS)
def test_momentum_statistics_start_from_first_batch(impl):
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.5).double()
    layer.impl = impl
    x1, x2 = (x.detach() for x in inputs((4, C, 3, 3), steps=2))
    layer(x1)
    assert bool(layer.momentum_initialized)
    close(layer.momentum_mean, x1.mean((0, 2, 3)), steps=1, what="momentum_mean")
    close(layer.momentum_var, x1.var((0, 2, 3), unbiased=False), steps=1, what="momentum_var")
    layer(x2)
    close(layer.momentum_mean, 0.5 * x1.mean((0, 2, 3)) + 0.5 * x2.mean((0, 2, 3)), steps=2, what="momentum_mean")
    close(layer.momentum_var, 0.5 * x1.var((0, 2, 3), unbiased=False) + 0.5 * x2.var((0, 2, 3), unbiased=False), steps=2,
          what="momentum_var")


def test_float32_accuracy_with_large_mean():
    # |mean| >> std must not cost precision (no E[x^2] - E[x]^2 cancellation), on the lam > 0 path too.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, C, 16, 16, generator=gen) * 0.01 + 100.0
    expected = nn.BatchNorm2d(C).double()(x.double())  # same batch twice: M, Phi = batch statistics
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.5)
    layer(x)
    error = (layer(x).double() - expected).abs().max().item()
    bn_error = (nn.BatchNorm2d(C)(x).double() - expected).abs().max().item()
    assert error <= max(2 * bn_error, 1e-5), (error, bn_error)


def test_double_backward_is_rejected():
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.5)
    layer(torch.randn(4, C, 2, 2))
    x = torch.randn(4, C, 2, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=False)
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


# -- module reuse, batch size 1, dtypes ----------------------------------------------------------------


def test_layer_reused_twice_in_one_forward():
    # Siamese-style reuse: the second call updates the buffers before the first call's backward.
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.4).double()
    ref = reference_copy(layer)
    x0, x1, x2 = inputs((4, C, 2, 2), steps=3)
    layer(x0.detach())
    ref(x0.detach())
    y = (layer(x1) * layer(x2)).sum()
    y_ref = (ref(x1) * ref(x2)).sum()
    for a, e in zip(torch.autograd.grad(y, (x1, x2)), torch.autograd.grad(y_ref, (x1, x2))):
        close(a, e, steps=3, what="gradient")


def test_batch_size_one():
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.5)
    x = torch.randn(1, C, 4, 4, requires_grad=True)
    for _ in range(2):
        y = layer(x)
        y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert layer.lam == 0.5 and layer.tau == pytest.approx(0.9 ** (1 / 32))
    layer1d = MomentumBatchNorm1d(C)
    layer1d(torch.randn(1, C, 5))  # (1, C, L): 5 values per channel
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer1d(torch.randn(1, C))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_autocast_cpu(dtype, lam):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    mbn = MomentumBatchNorm2d(8, schedule="fixed", fixed_lam=lam)
    bn = nn.BatchNorm2d(8)
    x = torch.randn(4, 3, 8, 8)
    mbn(conv(x).detach())  # initialize, so the next step uses lam
    reference = copy.deepcopy(mbn)
    with torch.autocast("cpu", dtype=dtype):
        features = conv(x)
        y = mbn(features)
        y_bn = bn(features)
    assert y.dtype == y_bn.dtype == features.dtype
    y.float().square().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert torch.isfinite(mbn.weight.grad).all() and mbn.momentum_mean.dtype == torch.float32
    expected = reference(features.detach().float())
    # The features are rounded to ``dtype`` (and normalized in float32): one rounding of the input,
    # a few of the output, norm-wise within 8 eps(dtype); M/Phi are float32 statistics of them.
    assert_close_normwise(y.float(), expected, dtype=dtype, steps=1, growth=8, what="output")
    assert_close_normwise(mbn.momentum_var, reference.momentum_var, dtype=dtype, steps=1, growth=8, what="momentum_var")


# -- schedule plumbing -----------------------------------------------------------------------------


def test_lam_before_progress_and_schedules():
    layer = MomentumBatchNorm2d(C, ideal_batch_size=32)
    assert layer.lam == 0.0 and layer.tau == pytest.approx(0.9)  # before anything: plain BN
    layer(torch.randn(4, C, 2, 2))
    assert layer.lam == 0.0  # no progress set yet
    assert layer.tau == pytest.approx(schedule.tau(4, 32, 0.9))
    set_progress(layer, 3.75, 5)
    assert layer.lam == pytest.approx(schedule.lam(3, 5, 4, 32))  # "epoch" uses the integer part
    iteration = MomentumBatchNorm2d(C, schedule="iteration", batch_size=4)
    set_progress(iteration, 3.75, 5)
    assert iteration.lam == pytest.approx(schedule.lam(3.75, 5, 4, 32))  # m fixed: known before any forward
    fixed = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.25)
    set_progress(fixed, 2, 5)
    assert fixed.lam == 0.25


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_uses_lam_of_current_progress_and_batch_size(impl):
    # lam is cached and refreshed by set_progress and on a new m, never recomputed per step.
    layer = MomentumBatchNorm2d(C, ideal_batch_size=8, schedule="iteration").double()
    layer.impl = impl
    x0, x1, x2 = (x.detach() for x in inputs((4, C, 2, 2), steps=3))
    x3 = inputs((2, C, 2, 2), steps=1, seed=5)[0].detach()
    layer(x0)  # initializes M from x0
    for epoch, x in ((2.5, x1), (4.0, x2), (4.0, x3)):
        set_progress(layer, epoch, 5)
        lam = schedule.lam(epoch, 5, x.shape[0], 8)
        expected = lam * layer.momentum_mean + (1 - lam) * x.mean((0, 2, 3))
        layer(x)
        assert layer.lam == pytest.approx(lam) and lam > 0
        close(layer.momentum_mean, expected, steps=1, what="momentum_mean")


@pytest.mark.parametrize("schedule_name", ["epoch", "iteration"])
@pytest.mark.parametrize("total_epochs", [6, 200])
def test_first_epoch_runs_the_native_batchnorm_path(schedule_name, total_epochs):
    # lam(1, T, m, m0) is exactly 0.0, not a rounding residue, so the run's first step (epoch 1,
    # batch 0 of the per-iteration schedule) takes the native BN path, not the custom Function.
    layer = MomentumBatchNorm2d(C, ideal_batch_size=32, schedule=schedule_name)
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    layer(x.detach())  # initializes M/Phi
    set_progress(layer, 1 + 0 / 50, total_epochs)
    assert layer.lam == 0.0
    assert type(layer(x).grad_fn).__name__ == "NativeBatchNormBackward0"
    set_progress(layer, 2, total_epochs)
    assert layer.lam > 0.0
    assert type(layer(x).grad_fn).__name__ == "_MomentumBatchNormFunctionBackward"


def test_batch_size_argument_fixes_m():
    layer = MomentumBatchNorm2d(C, batch_size=8, ideal_batch_size=32)
    set_progress(layer, 4, 5)
    layer(torch.randn(2, C, 3, 3))
    assert layer.lam == pytest.approx(schedule.lam(4, 5, 8, 32))
    assert layer.tau == pytest.approx(schedule.tau(8, 32, 0.9))


def test_set_progress_counts_layers_and_accepts_a_cached_list():
    model = nn.Sequential(nn.Conv2d(3, C, 1), MomentumBatchNorm2d(C), nn.Sequential(MomentumBatchNorm2d(C), nn.BatchNorm2d(C)))
    assert set_progress(model, 1, 3) == 2
    layers = mbn_layers(model)
    assert len(layers) == 2 and all(isinstance(layer, MomentumBatchNorm) for layer in layers)
    assert set_progress(layers, 2.5, 3) == 2
    assert set_progress(nn.Linear(2, 2), 1, 3) == 0
    with pytest.raises(ValueError, match="1-based"):
        set_progress(model, 0, 3)
    with pytest.raises(ValueError, match="total epochs"):
        set_progress(model, 1, 0)


# -- state -----------------------------------------------------------------------------------------


def test_state_dict_keys():
    keys = set(MomentumBatchNorm2d(C).state_dict())
    bn_keys = set(nn.BatchNorm2d(C).state_dict())
    assert bn_keys <= keys
    assert keys - bn_keys == {"momentum_mean", "momentum_var", "momentum_initialized"}


def test_batchnorm_checkpoint_loads_strict_and_reinitializes_momentum():
    bn = nn.BatchNorm2d(C)
    for x in inputs((4, C, 3, 3), steps=2):
        bn(x.detach().float())
    layer = MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.5)
    layer(torch.randn(4, C, 3, 3) + 10)  # stale momentum statistics that must not survive the load
    layer.load_state_dict(bn.state_dict(), strict=True)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, key), getattr(bn, key))
    assert not bool(layer.momentum_initialized)
    x = torch.randn(4, C, 3, 3)
    layer(x)  # first batch after the load: lam = 0
    assert_close_normwise(layer.momentum_mean, x.mean((0, 2, 3)), dtype=torch.float32, steps=1, growth=ONE_PASS_GROWTH)


def test_resume_continues_exactly():
    def make():
        return nn.Sequential(nn.Conv2d(2, C, 3, padding=1), MomentumBatchNorm2d(C, schedule="iteration", ideal_batch_size=8))

    torch.manual_seed(0)
    model = make()
    batches = [torch.randn(2, 2, 4, 4) for _ in range(6)]
    for i, x in enumerate(batches[:3]):
        set_progress(model, 1 + i / 3, 2)
        model(x)
    resumed = make()
    resumed.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
    for i, x in enumerate(batches[3:]):
        set_progress(model, 1 + (i + 3) / 3, 2)
        set_progress(resumed, 1 + (i + 3) / 3, 2)
        assert torch.equal(model(x), resumed(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_convert_to_batchnorm_has_identical_eval_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), MomentumBatchNorm2d(C, schedule="fixed", fixed_lam=0.5), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    for _ in range(4):
        model(torch.randn(4, 3, 6, 6))
    model.eval()
    x = torch.randn(5, 3, 6, 6)
    expected = model(x)
    state = {k: v.clone() for k, v in model[1].state_dict().items()}
    converted = convert(model)
    assert type(converted[1]) is nn.BatchNorm2d
    assert not converted[1].training
    assert torch.equal(converted(x), expected)
    for key, value in converted[1].state_dict().items():  # MBN -> BN state_dict round trip
        assert torch.equal(value, state[key]), key


def test_impl_is_checked_shown_and_not_saved():
    layer = MomentumBatchNorm2d(C)
    assert layer.impl == "fast" and "impl" not in repr(layer)
    with pytest.raises(ValueError, match="impl must be one of"):
        layer.impl = "slow"
    reference = reference_copy(layer)
    assert "impl='reference'" in repr(reference)
    assert list(reference.state_dict()) == list(layer.state_dict())


def test_reset_running_stats():
    layer = MomentumBatchNorm2d(C)
    layer(torch.randn(4, C, 2, 2) + 3)
    layer.reset_running_stats()
    assert not bool(layer.momentum_initialized) and int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(C)) and torch.equal(layer.running_var, torch.ones(C))


# -- distributed: SyncBatchNorm conversion must not swallow MBN --------------------------------------


def test_convert_sync_batchnorm_keeps_mbn_and_brn():
    from mbn.nn import BatchRenorm2d

    model = nn.Sequential(MomentumBatchNorm2d(C), BatchRenorm2d(C), nn.BatchNorm2d(C))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[0]) is MomentumBatchNorm2d
    assert type(synced[1]) is BatchRenorm2d
    assert type(synced[2]) is nn.SyncBatchNorm  # plain BN is converted as usual


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_features": 0}, "num_features"),
        ({"ideal_batch_size": 0}, "m0"),
        ({"tau0": 1.5}, "tau0"),
        ({"schedule": "cosine"}, "schedule"),
        ({"schedule": "fixed"}, "fixed_lam"),
        ({"schedule": "fixed", "fixed_lam": 1.0}, "fixed_lam"),
        ({"fixed_lam": 0.5}, "fixed_lam"),
        ({"batch_size": 0}, "batch_size"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_constructor_validation(kwargs, match):
    kwargs = {"num_features": C, **kwargs}
    with pytest.raises(ValueError, match=match):
        MomentumBatchNorm2d(**kwargs)


def test_input_validation():
    with pytest.raises(ValueError, match="4D"):
        MomentumBatchNorm2d(C)(torch.randn(2, C, 3))
    with pytest.raises(ValueError, match=r"\(N, 3, \.\.\.\)"):
        MomentumBatchNorm2d(C)(torch.randn(2, C + 1, 3, 3))
    with pytest.raises(ValueError, match="2D or 3D"):
        MomentumBatchNorm1d(C)(torch.randn(2, C, 3, 3))
