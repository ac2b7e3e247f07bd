"""Moving Average Batch Normalization (Yan et al., ICLR 2020; reference code: megvii-model/MABN)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mbn.nn._batch_stats_norm import BatchStatsNorm
from mbn.nn._input_checks import check_int, check_number
from mbn.nn.centered_conv import centered

__all__ = [
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
]


def _channel_view(t: Tensor, dim: int) -> Tensor:
    return t.view(1, -1, *([1] * (dim - 2)))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


class _MABNFunction(torch.autograd.Function):
    """``y = weight * r * x / sqrt(chi + eps) + bias`` with MABN's backward (not the true gradient).

    The backward of the reference's ``BatchNormFunction``: with ``g = dL/dy * weight * r`` and
    ``z = x / sqrt(chi + eps)``, ``dL/dx = (g - z * psi) / sqrt(chi + eps)``, where ``psi`` is the
    exponential moving average of the batch statistic ``psi_B = mean(g * z)`` over the iterations
    (the paper's EMAS of Psi), or ``psi_B`` itself while ``batch_grad_stats`` (MABN's warmup, where it
    is the true gradient of the batch-second-moment normalization). ``grad_ema`` is updated in place.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor | None, bias: Tensor | None, chi: Tensor, r: Tensor,
                eps: float, grad_ema: Tensor, grad_momentum: float, batch_grad_stats: bool, first: bool) -> Tensor:
        dim = input.dim()
        inv_std = torch.rsqrt(chi + eps)
        z = input * _channel_view(inv_std, dim)
        y_hat = z * _channel_view(r, dim)
        ctx.save_for_backward(z, inv_std, r, weight)
        ctx.grad_ema, ctx.grad_momentum, ctx.batch_grad_stats, ctx.first = grad_ema, grad_momentum, batch_grad_stats, first
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        if weight is None:
            return y_hat
        return torch.addcmul(_channel_view(bias, dim), y_hat, _channel_view(weight, dim))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        z, inv_std, r, weight = ctx.saved_tensors
        dim, dims = grad_output.dim(), _reduce_dims(grad_output)
        scale = r if weight is None else weight * r
        g = grad_output * _channel_view(scale, dim)
        psi_batch = (g * z).mean(dims)
        grad_ema = ctx.grad_ema
        with torch.no_grad():
            if ctx.first:
                grad_ema.copy_(psi_batch)
            else:
                grad_ema.lerp_(psi_batch, ctx.grad_momentum)
        psi = psi_batch if ctx.batch_grad_stats else grad_ema
        grad_input = (g - z * _channel_view(psi, dim)) * _channel_view(inv_std, dim)
        grad_weight = (grad_output * z).sum(dims) * r if ctx.has_weight and ctx.needs_input_grad[1] else None
        grad_bias = grad_output.sum(dims) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class MovingAverageBatchNorm(BatchStatsNorm):
    """Moving Average Batch Normalization (MABN); base class of the 1d/2d/3d variants.

    Training step ``t`` (0-based), per channel, with ``chi_B = mean(x^2)`` over the batch and the
    spatial positions (no mean is subtracted: the convolution in front is centered instead, see
    :func:`~mbn.nn.bind_norm` and :class:`~mbn.nn.CenteredConv2d`)::

        chi   = mean of chi_B over the last min(t + 1, window) steps, this one included (the paper's
                SMAS); chi_B itself while t < warmup_steps
        r     = clip(sqrt(chi + eps) / sqrt(running_var + eps), 1 / r_max, r_max); 1 while t < renorm_warmup_steps
        y     = weight * r * x / sqrt(chi + eps) + bias

    ``r`` is a constant, as in Batch Renorm. Backward (by design not the gradient of this forward;
    the reference's ``BatchNormFunction``): ``dL/dx = (g - z * psi) / sqrt(chi + eps)`` with
    ``g = dL/dy * weight * r``, ``z = x / sqrt(chi + eps)`` and ``psi`` the exponential moving
    average (momentum ``grad_momentum``, the weight of the new batch) of ``psi_B = mean(g * z)``
    (the paper's EMAS); ``psi_B`` itself while ``t < warmup_steps``, where the backward is the
    true gradient. The reference code averages ``psi_B`` over the same window as ``chi_B`` instead.
    ``running_var`` (the running second moment) follows ``chi`` with ``momentum``; eval mode is
    ``weight * x / sqrt(running_var + eps) + bias``. ``running_mean`` stays zero, so the eval forward is
    exactly ``nn.BatchNorm``'s with these buffers and :func:`mbn.nn.convert` to BN is exact.

    Any batch size (the reference's classification code hard-codes 2) and any window; batches of
    different sizes weigh the same in the window. The window (``window_sq``), ``grad_ema`` and the
    step count are buffers, so a resumed run continues where it stopped. Under DDP the statistics
    are per device, as in the reference: no statistic is synchronized across devices, each device's
    batch statistics are its own batch's. DDP's default buffer broadcast (``broadcast_buffers=True``)
    copies rank 0's buffers (``window_sq``, ``grad_ema``, ``running_var``) to every device before each
    forward, so a device averages rank 0's past iterations with its own current batch (the
    per-device history of :mod:`mbn.train.ddp_buffers` covers MBN only).

    Args:
        num_features: number of channels ``C``.
        window: iterations in the forward statistics' moving average, the current one included (>= 1).
        momentum: running-statistics momentum (weight of the new statistic; the reference's 0.98 is
            the weight of the old one).
        grad_momentum: momentum of the backward statistic's exponential moving average (weight of the new one).
        warmup_steps: training steps that use the batch's own statistics (forward and backward).
        r_max: limit of the renormalization factor ``r`` (>= 1; 1 = no renormalization).
        renorm_warmup_steps: training steps with ``r = 1``.
        eps: added to the second moments before the square root.
        affine: learn a per-channel scale and shift.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
    """

    def __init__(
        self,
        num_features: int,
        window: int = 16,
        momentum: float = 0.02,
        grad_momentum: float = 0.02,
        warmup_steps: int = 100,
        r_max: float = 5.0,
        renorm_warmup_steps: int = 1000,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)  # validates num_features and eps
        name = type(self).__name__
        for arg, value in (("momentum", momentum), ("grad_momentum", grad_momentum)):
            check_number(name, arg, value, 0.0, 1.0, low_open=True)
        check_number(name, "r_max", r_max, 1.0)
        for arg, value, low in (("window", window, 1), ("warmup_steps", warmup_steps, 0), ("renorm_warmup_steps", renorm_warmup_steps, 0)):
            check_int(name, arg, value, low)
        self.window = window
        self.momentum = float(momentum)
        self.grad_momentum = float(grad_momentum)
        self.warmup_steps = warmup_steps
        self.r_max = float(r_max)
        self.renorm_warmup_steps = renorm_warmup_steps
        # (C, window): channels first, as every per-channel tensor (stacked models stack along dim 0).
        self.register_buffer("window_sq", torch.zeros(num_features, window, device=device, dtype=dtype))
        self.register_buffer("grad_ema", torch.zeros(num_features, device=device, dtype=dtype))
        self._step = 0  # Python mirror of num_batches_tracked (see BatchStatsNorm._sync_with_buffers)

    def bind_preceding(self, layer: nn.Module) -> nn.Module:
        """The convolution in front, centered (:func:`~mbn.nn.centered`): part of the method.

        Args:
            layer: the layer whose output this norm normalizes (not a convolution: returned unchanged).
        """
        return centered(layer)

    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        output = self._training_step(input, self.weight, self.bias, self.window_sq, self.grad_ema, self.running_var, self._step)
        self._step += 1  # the base class counts num_batches_tracked
        return output

    def _training_step(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, window_sq: Tensor,
                       grad_ema: Tensor, running_var: Tensor, step: int) -> Tensor:
        """Training step ``step`` on ``input``'s channels with these (views of the) parameters and buffers.

        Updates ``window_sq`` and ``running_var`` in place now, ``grad_ema`` in the backward. A hook for
        layers that hold several runs' channels (:mod:`mbn.models.stacked_layers`), whose runs may
        stand at different steps.
        """
        dims = _reduce_dims(input)
        with torch.no_grad():
            chi_batch = input.square().mean(dims).to(window_sq.dtype)
            window_sq[:, step % self.window].copy_(chi_batch)
            chi = chi_batch if step < self.warmup_steps else window_sq[:, : min(step + 1, self.window)].mean(1)
            limit = 1.0 if step < self.renorm_warmup_steps else self.r_max
            r = (torch.sqrt(chi + self.eps) / torch.sqrt(running_var + self.eps)).clamp_(1.0 / limit, limit)
            running_var.lerp_(chi, self.momentum)
        return _MABNFunction.apply(input, weight, bias, chi.to(input.dtype), r.to(input.dtype), self.eps,
                                   grad_ema, self.grad_momentum, step < self.warmup_steps, step == 0)

    def _reset_own_buffers(self) -> None:
        self.window_sq.zero_()
        self.grad_ema.zero_()

    def _sync_with_buffers(self) -> None:
        self._step = int(self.num_batches_tracked)
        self.running_mean.zero_()  # MABN subtracts no mean (a BN checkpoint's running_mean would leak into eval)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.window}, momentum={self.momentum}, grad_momentum={self.grad_momentum}, "
            f"warmup_steps={self.warmup_steps}, r_max={self.r_max}, renorm_warmup_steps={self.renorm_warmup_steps}, "
            f"eps={self.eps}, affine={self.affine}"
        )


class MovingAverageBatchNorm1d(MovingAverageBatchNorm, input_rank=1):
    """:class:`MovingAverageBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs (see the base class for Args)."""


class MovingAverageBatchNorm2d(MovingAverageBatchNorm, input_rank=2):
    """:class:`MovingAverageBatchNorm` for ``(N, C, H, W)`` inputs (see the base class for Args)."""


class MovingAverageBatchNorm3d(MovingAverageBatchNorm, input_rank=3):
    """:class:`MovingAverageBatchNorm` for ``(N, C, D, H, W)`` inputs (see the base class for Args)."""
