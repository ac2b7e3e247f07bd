"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021; reference code: Howal/Cross-iterationBatchNorm)."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.nn._batch_stats_norm import BatchStatsNorm
from mbn.nn._input_checks import check_int, check_number
from mbn.nn.functional import batch_share_backward

__all__ = [
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "conv2d_statistics_derivatives",
    "cross_iteration_batch_norm",
    "cross_iteration_batch_norm_fast",
]


# Attributes CBN sets on the convolution in front (in its __dict__: they are neither parameters nor
# buffers, and a deep copy of the convolution carries them with its hook).
_RECORDS_IO = "_cbn_records_io"
_LAST_IO = "_cbn_last_io"


def _channel_view(t: Tensor, dim: int) -> Tensor:
    return t.view(1, -1, *([1] * (dim - 2)))


def cross_iteration_batch_norm(input: Tensor, past_mean: Tensor, past_sq: Tensor, weight: Tensor | None,
                               bias: Tensor | None, eps: float) -> Tensor:
    """CBN's training output, given the past iterations' compensated statistics (the paper's Eq. 8-9).

    With ``mu_0, nu_0`` the batch mean and second moment of ``input`` and ``mu_j, nu_j`` the rows of
    ``past_mean, past_sq`` (constants: no gradient flows into past iterations), per channel::

        mean = (1/n) sum_j mu_j,   var = (1/n) sum_j max(nu_j, mu_j^2) - mean^2,   n = 1 + len(past)
        y    = weight * (input - mean) / sqrt(var + eps) + bias

    The gradient of this function is the true one (``gradcheck`` in the tests).

    Args:
        input: ``(N, C, *)``.
        past_mean: ``(j, C)`` compensated means of the past ``j`` iterations (``j = 0``: plain BN).
        past_sq: ``(j, C)`` compensated second moments ``mean(x^2)``.
        weight: per-channel scale or None.
        bias: per-channel shift or None.
        eps: added to the variance.

    Returns:
        The normalized input.
    """
    dims, dim = [0, *range(2, input.dim())], input.dim()
    mean_now = input.mean(dims)
    sq_now = input.square().mean(dims)
    means = torch.cat([mean_now.unsqueeze(0), past_mean.to(input.dtype)])
    sqs = torch.cat([sq_now.unsqueeze(0), past_sq.to(input.dtype)])
    mean = means.mean(0)
    var = torch.maximum(sqs, means.square()).mean(0) - mean.square()
    output = (input - _channel_view(mean, dim)) * _channel_view(torch.rsqrt(var + eps), dim)
    if weight is None:
        return output
    return torch.addcmul(_channel_view(bias, dim), output, _channel_view(weight, dim))


def cross_iteration_batch_norm_fast(
    input: Tensor,
    past_mean: Tensor,
    past_sq: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cross_iteration_batch_norm` (same output and gradients) in two native BN passes.

    The batch's mean and biased variance come from ``batch_norm_update_stats`` (which also updates
    the running statistics, as ``nn.BatchNorm`` with ``momentum``), its second moment is
    ``var + mean^2`` (so ``max(nu_0, mu_0^2) = nu_0``); the output is eval-mode ``batch_norm`` with
    the pooled statistics. With ``n`` iterations pooled, ``x_hat = (x - mean) * s`` and ``M`` values
    per channel, the gradient of the definition is

        dx = w * s * (g - sum(g) / (n M) - x_hat * sum(g * x_hat) / (n M))

    (the current batch's statistics enter the pooled ones with weight ``1 / n``): MBN's backward with
    ``lam = 1 - 1 / n`` about its own center (:func:`mbn.nn.functional.batch_share_backward`, one
    native BN backward and a per-channel correction). Tested against the definition (outputs,
    gradients, the ``max`` of the past statistics).

    Args:
        input: ``(N, C, *)``.
        past_mean: ``(j, C)`` compensated means of the past ``j`` iterations (constants).
        past_sq: ``(j, C)`` compensated second moments.
        weight: per-channel scale or None.
        bias: per-channel shift or None.
        eps: added to the variance.
        running_mean: updated in place with the batch mean (momentum ``momentum``), or None.
        running_var: updated in place with the batch's unbiased variance, or None.
        momentum: weight of the batch in the running statistics.

    Returns:
        ``(output, batch mean, batch second moment)``, the statistics detached, each ``(C,)``.
    """
    with torch.no_grad():
        mean_now, var_now = torch.batch_norm_update_stats(input.detach(), running_mean, running_var, momentum)
        sq_now = torch.addcmul(var_now, mean_now, mean_now)
        # The statistics' dtype: float32 for a half input under autocast (the native kernels' parameter dtype).
        past_mean, past_sq = past_mean.to(mean_now.dtype), past_sq.to(mean_now.dtype)
        share = 1.0 / (1 + past_mean.shape[0])
        mean = torch.add(mean_now, past_mean.sum(0)).mul_(share)
        var = torch.maximum(past_sq, past_mean.square()).sum(0).add_(sq_now).mul_(share).sub_(mean.square())
    output = _CrossIterationBatchNormFunction.apply(input, weight, bias, mean, var, share, eps)
    return output, mean_now, sq_now


class _CrossIterationBatchNormFunction(torch.autograd.Function):
    """Normalization with pooled statistics whose dependence on ``input`` is the current batch's,
    with weight ``share`` (see :func:`cross_iteration_batch_norm_fast`)."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, share, eps):  # noqa: D102
        if any(ctx.needs_input_grad[:3]):
            # mbn.nn.functional.batch_share_backward's arguments, with lam = 1 - share; the variance
            # is taken about the pooled mean itself (no shift).
            invstd = torch.add(var, eps).rsqrt_()
            ctx.save_for_backward(input)
            ctx.center, ctx.lam, ctx.shift, ctx.root = mean, 1.0 - share, None, math.sqrt(share)
            ctx.scale = invstd.clone() if weight is None else invstd * weight  # w * s
            ctx.invstd = invstd.mul_(ctx.root)  # s * c
            ctx.weight = (torch.ones_like(invstd) if weight is None else weight) / ctx.root  # w / c
        return torch.batch_norm(input, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        return (*batch_share_backward(ctx, grad_output, "CrossIterationBatchNorm"), None, None, None, None)


def conv2d_statistics_derivatives(conv_input: Tensor, output: Tensor, conv: nn.Conv2d,
                                  out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The derivatives of the batch statistics of ``output = conv(conv_input)`` by the conv weight.

    Per output channel ``c``, with ``p`` the input patches (positions of all images) and ``y_c = W[c] . p
    (+ bias)``::

        d mean(y_c)   / d W[c] = mean(p)              (the same for every channel of a group)
        d mean(y_c^2) / d W[c] = 2 mean(y_c p)

    Both are weight gradients of the convolution (with the output gradients ``1 / count`` and
    ``2 y / count``), taken in one call: the second moments' channels and one channel of ones per
    group. This is what CBN's autograd definition computes with two backward passes through the
    convolution (``torch.autograd.grad`` of the statistics); tested against it.

    Args:
        conv_input: the convolution's input ``(N, C_in, H, W)``.
        output: its output ``(N, C, H', W')``.
        conv: an ``nn.Conv2d`` (``padding_mode="zeros"``, numeric padding) whose forward convolves with its ``weight``.
        out: tensors of the weight's shape to write ``(dmean, dsq)`` into (e.g. views of a window), or None.

    Returns:
        ``(dmean, dsq)``, each of the weight's shape ``(C, C_in / groups, kh, kw)`` (``out`` when given).
    """
    channels, groups = output.shape[1], conv.groups
    per_group = channels // groups
    count = output.numel() // channels
    grads = output.new_empty(output.shape[0], groups, per_group + 1, *output.shape[2:])
    torch.mul(output.detach().unflatten(1, (groups, per_group)), 2.0 / count, out=grads[:, :, :per_group])
    grads[:, :, per_group:].fill_(1.0 / count)
    shape = conv.weight.shape[1:]
    # Under autocast the convolution ran on its input cast to the output's dtype.
    both = torch.nn.grad.conv2d_weight(conv_input.detach().to(grads.dtype), (groups * (per_group + 1), *shape), grads.flatten(1, 2),
                                       conv.stride, conv.padding, conv.dilation, groups).unflatten(0, (groups, per_group + 1))
    if out is None:
        out = (conv.weight.new_empty(conv.weight.shape), conv.weight.new_empty(conv.weight.shape))
    dmean, dsq = out
    dmean.unflatten(0, (groups, per_group)).copy_(both[:, per_group:])  # broadcast over the group's channels
    dsq.unflatten(0, (groups, per_group)).copy_(both[:, :per_group])
    return dmean, dsq


def _record_io(conv: nn.Module, args: tuple, output: Tensor) -> None:
    # Forward hook on the convolution in front of a CBN layer: its last training input and output, as
    # weak references (nothing is kept alive; a deep copy carries them, and they never match the copy's tensors).
    if conv.training and torch.is_grad_enabled() and not _compiling():
        conv.__dict__[_LAST_IO] = (weakref.ref(args[0]), weakref.ref(output))


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _convolves_its_weight(layer: nn.Module) -> bool:
    # Layers whose forward is nn.Conv2d's convolution with their own weight (a centered one is not).
    return ((type(layer) is nn.Conv2d or getattr(type(layer), "convolves_its_weight", False))
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


class CrossIterationBatchNorm(BatchStatsNorm):
    """Cross-Iteration Batch Normalization (CBN); base class of the 1d/2d/3d variants.

    The statistics of training step ``t`` pool the batch means ``mu`` and second moments
    ``nu = mean(x^2)`` of the last ``window`` iterations (this one included). A past iteration's
    statistics were computed with the weights ``W_{t-tau}`` of the convolution in front; they are
    compensated for its change since then by their first-order Taylor expansion, per output channel
    ``c`` (which depends only on ``W[c]``)::

        mu_{t-tau}(W_t) ~= mu_{t-tau} + sum(d mu_{t-tau} / d W[c] * (W_t[c] - W_{t-tau}[c]))   (same for nu)

    and pooled as in :func:`cross_iteration_batch_norm` (with the paper's ``max(nu, mu^2)``, which
    keeps the variance non-negative). The derivatives ``d mu / d W`` and ``d nu / d W`` are, by
    definition, autograd's through the current batch's graph (two extra weight-gradient passes of
    the convolution per step); in front of a plain ``nn.Conv2d`` (zero padding) they are computed
    from its recorded input in one weight-gradient call of about one pass
    (:func:`conv2d_statistics_derivatives`, tested against the definition). They are stored with
    the weights and the statistics. For the first ``burnin_steps`` the
    layer is plain BN (the paper's burn-in: the early weights change too fast for a first-order
    compensation); the window then fills over ``window - 1`` steps. The running statistics follow
    the current batch's mean and unbiased variance (``momentum``, PyTorch's convention), as in the
    reference code, so eval mode is ``nn.BatchNorm``'s and :func:`mbn.nn.convert` to BN is exact.
    With ``window=1`` the layer is exactly ``nn.BatchNorm``.

    The layer needs its preceding convolution (or linear layer): the backbones of
    :mod:`mbn.models` and :func:`mbn.nn.convert_norm` hand it over with :func:`mbn.nn.bind_norm`,
    which allocates the window's buffers (statistics, derivatives and weights of ``window - 1``
    iterations: ``3 * (window - 1)`` copies of the convolution's weight), so a resumed run continues
    with its window. A training step under ``torch.no_grad`` (or with a frozen input) cannot take
    the derivatives and stores zero ones (a frozen convolution does not change anyway). Under DDP
    the statistics are per device, as in the reference: no statistic is synchronized across
    devices, the current batch's are the device's own. DDP's default buffer broadcast
    (``broadcast_buffers=True``) copies rank 0's buffers (the window and the running statistics) to
    every device before each forward, so a device pools rank 0's past iterations with its own
    current batch (the per-device history of :mod:`mbn.train.ddp_buffers` covers MBN only).

    Args:
        num_features: number of channels ``C``.
        window: iterations pooled, the current one included (the paper's ``k``; 1 = plain BN).
        burnin_steps: training steps of plain BN before the window is used (0, the reference layer's
            default; the reference trains with a burn-in of 8 epochs, which ``norm=cbn`` converts to steps).
        momentum: running-statistics momentum (weight of the new batch).
        eps: added to the variance.
        affine: learn a per-channel scale and shift.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
    """

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        burnin_steps: int = 0,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)  # validates num_features and eps
        name = type(self).__name__
        check_number(name, "momentum", momentum, 0.0, 1.0)
        for arg, value, low in (("window", window, 1), ("burnin_steps", burnin_steps, 0)):
            check_int(name, arg, value, low)
        self.window = window
        self.burnin_steps = burnin_steps
        self.momentum = float(momentum)
        past = window - 1
        # Channels first, as every per-channel tensor (stacked models stack along dim 0): (C, past) ...
        self.register_buffer("past_mean", torch.zeros(num_features, past, device=device, dtype=dtype))
        self.register_buffer("past_sq", torch.zeros(num_features, past, device=device, dtype=dtype))
        # ... and (C, past, *weight shape[1:]) each, allocated by bind_preceding (the weight's shape is known then).
        self.register_buffer("past_weight", None)
        self.register_buffer("past_dmean", None)
        self.register_buffer("past_dsq", None)
        self._preceding: tuple[nn.Module, ...] = ()  # a tuple: not registered as a submodule (no second state_dict entry)
        self._step = 0  # Python mirror of num_batches_tracked (see BatchStatsNorm._sync_with_buffers)

    def bind_preceding(self, layer: nn.Module) -> nn.Module:
        """Keep ``layer`` (whose weight the statistics are compensated for) and allocate the window.

        Args:
            layer: the convolution or linear layer in front, with ``weight`` of shape ``(C, ...)``.

        Returns:
            ``layer``, unchanged.

        Raises:
            ValueError: ``layer`` has no weight with ``num_features`` output channels.
        """
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2 or weight.shape[0] != self.num_features:
            shape = None if not isinstance(weight, Tensor) else tuple(weight.shape)
            raise ValueError(f"{type(self).__name__}({self.num_features}): the layer in front must have a weight of shape "
                             f"({self.num_features}, ...); got {type(layer).__name__} with weight {shape}")
        self._preceding = (layer,)
        if _convolves_its_weight(layer) and not layer.__dict__.get(_RECORDS_IO, False):
            layer.register_forward_hook(_record_io)
            layer.__dict__[_RECORDS_IO] = True
        past = (self.num_features, self.window - 1, *weight.shape[1:])
        if self.past_weight is None or self.past_weight.shape != past:  # else a re-link after a copy: keep the window
            factory = {"device": self.past_mean.device, "dtype": self.past_mean.dtype}
            self.past_weight = torch.zeros(past, **factory)
            self.past_dmean = torch.zeros(past, **factory)
            self.past_dsq = torch.zeros(past, **factory)
        return layer

    @property
    def preceding_layer(self) -> nn.Module | None:
        """The layer bound by :meth:`bind_preceding` (None before)."""
        return self._preceding[0] if self._preceding else None

    def _filled(self, step: int) -> int:
        """Past iterations in the window at training step ``step``."""
        return min(max(step - self.burnin_steps, 0), self.window - 1)

    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        step = self._step
        self._step += 1  # the base class counts num_batches_tracked
        return self._training_step(input, self.weight, self.bias, slice(None), step)

    def _training_step(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, channels: slice, step: int) -> Tensor:
        """Training step ``step`` on ``input``, the layer's ``channels`` (with their ``weight``, ``bias``).

        Updates those channels' running statistics and window in place. A hook for layers that hold
        several runs' channels (:mod:`mbn.models.stacked_layers`), whose runs may stand at different steps.
        """
        running_mean, running_var = self.running_mean[channels], self.running_var[channels]
        if step < self.burnin_steps or self.window == 1:
            return F.batch_norm(input, running_mean, running_var, weight, bias, True, self.momentum, self.eps)
        if not self._preceding:
            raise RuntimeError(f"{type(self).__name__} needs the convolution in front of it: build the model with "
                               "mbn.models.build_model, or convert_norm(model, 'cbn'), or call mbn.nn.bind_norm(conv, norm)")
        full_weight = self._preceding[0].weight
        conv_weight = full_weight[channels]
        filled = self._filled(step)
        past_mean, past_sq = self.past_mean[channels], self.past_sq[channels]
        past_weight, past_dmean, past_dsq = self.past_weight[channels], self.past_dmean[channels], self.past_dsq[channels]
        with torch.no_grad():
            change = conv_weight.detach().unsqueeze(1) - past_weight[:, :filled]
            per_channel = tuple(range(2, change.dim()))
            compensated_mean = (past_mean[:, :filled] + (past_dmean[:, :filled] * change).sum(per_channel)).T
            compensated_sq = (past_sq[:, :filled] + (past_dsq[:, :filled] * change).sum(per_channel)).T
        output, mean, sq = cross_iteration_batch_norm_fast(input, compensated_mean, compensated_sq, weight, bias, self.eps,
                                                           running_mean, running_var, self.momentum)

        # Remember this iteration: its statistics, their derivatives by the conv weight, and that weight.
        slot = (step - self.burnin_steps) % (self.window - 1)
        differentiable = torch.is_grad_enabled() and input.requires_grad and full_weight.requires_grad
        with torch.no_grad():
            past_mean[:, slot].copy_(mean)
            past_sq[:, slot].copy_(sq)
            past_weight[:, slot].copy_(conv_weight)
            if not differentiable:
                past_dmean[:, slot].zero_()
                past_dsq[:, slot].zero_()
        if differentiable and not self._recorded_derivatives(input, (past_dmean[:, slot], past_dsq[:, slot])):
            dmean, dsq = self._autograd_derivatives(input, full_weight)
            with torch.no_grad():
                past_dmean[:, slot].copy_(dmean[channels])
                past_dsq[:, slot].copy_(dsq[channels])
        return output

    def _autograd_derivatives(self, input: Tensor, conv_weight: Tensor) -> tuple[Tensor, Tensor]:
        """``d mean / d W`` and ``d sq / d W`` of ``input``'s batch statistics by autograd through the
        graph from the weight (the definition; :meth:`_recorded_derivatives` is its fast path)."""
        dims = [0, *range(2, input.dim())]
        mean, sq = input.mean(dims), input.square().mean(dims)
        # Channel c depends only on W[c], so the gradient of sum_c mu_c is the per-channel d mu_c / d W[c].
        ones = torch.ones_like(mean)
        dmean, dsq = (torch.autograd.grad(stat, conv_weight, ones, retain_graph=True, allow_unused=True)[0] for stat in (mean, sq))
        if dmean is None:
            raise RuntimeError(f"{type(self).__name__}: its input does not depend on the weight of the layer bound to it "
                               f"({type(self._preceding[0]).__name__}); bind the layer directly in front")
        return dmean, dsq

    def _recorded_derivatives(self, input: Tensor, out: tuple[Tensor, Tensor]) -> bool:
        """Write :func:`conv2d_statistics_derivatives` from the convolution's recorded input into
        ``out`` when ``input`` is that whole convolution's output; False (nothing written) otherwise:
        the autograd definition applies."""
        conv = self._preceding[0]
        record = conv.__dict__.pop(_LAST_IO, None)
        if record is None:
            return False
        conv_input, output = record[0](), record[1]()
        if output is not input or conv_input is None or out[0].shape != conv.weight.shape:
            return False
        conv2d_statistics_derivatives(conv_input, input, conv, out=out)
        return True

    def _reset_own_buffers(self) -> None:
        for buffer in (self.past_mean, self.past_sq, self.past_weight, self.past_dmean, self.past_dsq):
            if buffer is not None:
                buffer.zero_()

    def _sync_with_buffers(self) -> None:
        self._step = int(self.num_batches_tracked)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window={self.window}, burnin_steps={self.burnin_steps}, momentum={self.momentum}, "
                f"eps={self.eps}, affine={self.affine}")


class CrossIterationBatchNorm1d(CrossIterationBatchNorm, input_rank=1):
    """:class:`CrossIterationBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs (see the base class for Args)."""


class CrossIterationBatchNorm2d(CrossIterationBatchNorm, input_rank=2):
    """:class:`CrossIterationBatchNorm` for ``(N, C, H, W)`` inputs (see the base class for Args)."""


class CrossIterationBatchNorm3d(CrossIterationBatchNorm, input_rank=3):
    """:class:`CrossIterationBatchNorm` for ``(N, C, D, H, W)`` inputs (see the base class for Args)."""
