"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021; reference code: Howal/Cross-iterationBatchNorm)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.nn._batch_stats_norm import BatchStatsNorm
from mbn.nn._input_checks import check_int, check_number

__all__ = [
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "cross_iteration_batch_norm",
]


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


class CrossIterationBatchNorm(BatchStatsNorm):
    """Cross-Iteration Batch Normalization (CBN); base class of the 1d/2d/3d variants.

    The statistics of training step ``t`` pool the batch means ``mu`` and second moments
    ``nu = mean(x^2)`` of the last ``window`` iterations (this one included). A past iteration's
    statistics were computed with the weights ``W_{t-tau}`` of the convolution in front; they are
    compensated for its change since then by their first-order Taylor expansion, per output channel
    ``c`` (which depends only on ``W[c]``)::

        mu_{t-tau}(W_t) ~= mu_{t-tau} + sum(d mu_{t-tau} / d W[c] * (W_t[c] - W_{t-tau}[c]))   (same for nu)

    and pooled as in :func:`cross_iteration_batch_norm` (with the paper's ``max(nu, mu^2)``, which
    keeps the variance non-negative). The derivatives ``d mu / d W`` and ``d nu / d W`` are taken by
    autograd from the current batch's graph (two extra weight-gradient passes of the convolution
    per step), and stored with the weights and the statistics. For the first ``burnin_steps`` the
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
            torch.batch_norm_update_stats(input.detach(), running_mean, running_var, self.momentum)
        output = cross_iteration_batch_norm(input, compensated_mean, compensated_sq, weight, bias, self.eps)

        # Remember this iteration: its statistics, their derivatives by the conv weight, and that weight.
        slot = (step - self.burnin_steps) % (self.window - 1)
        dims = [0, *range(2, input.dim())]
        mean, sq = input.mean(dims), input.square().mean(dims)
        differentiable = torch.is_grad_enabled() and input.requires_grad and full_weight.requires_grad
        if differentiable:
            # Channel c depends only on W[c], so the gradient of sum_c mu_c is the per-channel d mu_c / d W[c].
            ones = torch.ones_like(mean)
            dmean, dsq = (torch.autograd.grad(stat, full_weight, ones, retain_graph=True, allow_unused=True)[0] for stat in (mean, sq))
            if dmean is None:
                raise RuntimeError(f"{type(self).__name__}: its input does not depend on the weight of the layer bound to it "
                                   f"({type(self._preceding[0]).__name__}); bind the layer directly in front")
        with torch.no_grad():
            past_mean[:, slot].copy_(mean)
            past_sq[:, slot].copy_(sq)
            past_weight[:, slot].copy_(conv_weight)
            if differentiable:
                past_dmean[:, slot].copy_(dmean[channels])
                past_dsq[:, slot].copy_(dsq[channels])
            else:
                past_dmean[:, slot].zero_()
                past_dsq[:, slot].zero_()
        return output

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
