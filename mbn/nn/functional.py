"""Fused training-mode Momentum Batch Normalization (one custom autograd Function).

Per channel, over the batch and spatial dims (``n`` values):

    mu, var = batch mean and biased variance
    M   <- lam * M   + (1 - lam) * mu          (buffers; lam == 0 is plain BN)
    Phi <- lam * Phi + (1 - lam) * var
    y   = weight * (x - M) / sqrt(Phi + eps) + bias
    running_mean <- tau * running_mean + (1 - tau) * mu
    running_var  <- tau * running_var  + (1 - tau) * var * n / (n - 1)   (unbiased, as nn.BatchNorm)

Gradients flow through this batch's ``mu`` and ``var`` only (scaled by ``1 - lam``); the old ``M``
and ``Phi`` are constants. With ``s = 1 / sqrt(Phi + eps)``, ``k = (1 - lam) / n``:

    dx = weight * s * (g - k * sum(g) - k * s**2 * sum(g * (x - M)) * (x - mu))

Why not a chain of elementwise torch ops: that costs ~8 passes over the activation plus as many
autograd nodes, 1.3x-1.6x the step time of native BN on CPU. Here every pass over the activation is a
native kernel, and the per-channel arithmetic is a handful of tiny ops:

* statistics and running-statistics update: ``torch.batch_norm_update_stats`` (one op). Its CPU
  kernel is a scalar loop for channels-first inputs with spatial dims, so above
  ``_FAST_STATS_NUMEL`` values those use the corrected two-pass algorithm on vectorized kernels
  instead: ``m = mean(x)``, ``z = x - m`` (eval-mode ``batch_norm``), ``sum(z)`` and ``sum(z * z)``
  in one pass (the reduction of ``native_batch_norm_backward`` with ``g = z``, mean 0, invstd 1),
  ``mu = m + mean(z)``, ``var = mean(z^2) - mean(z)^2``. Equally accurate (no ``E[x^2] - E[x]^2``
  cancellation), 2-3x faster than the statistics kernel of PyTorch's own CPU BN;
* normalization: eval-mode ``batch_norm`` with ``M``/``Phi`` as its statistics (one pass);
* backward with ``lam == 0``: exactly BN's backward, one native ``native_batch_norm_backward``;
  with ``lam > 0``: one native reduction for ``sum(g)`` and ``sum(g * (x - M)) * s`` (which are
  also the bias/weight gradients), then ``dx = a * g + b * x + c`` per channel in two passes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["momentum_batch_norm"]

_batch_norm_backward = torch.ops.aten.native_batch_norm_backward

# Channels-first inputs with at least this many values take the vectorized statistics path
# (crossover measured on a 2-core Xeon: ~35 us either way at 32k values).
_FAST_STATS_NUMEL = 32768


def _update_batch_stats(input: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance (dtype of the running stats); updates the running stats in place."""
    if input.numel() < _FAST_STATS_NUMEL or input.dim() == 2 or not input.is_contiguous():
        return torch.batch_norm_update_stats(input, running_mean, running_var, momentum)
    n = input.numel() // input.shape[1]
    shift = torch.mean(input, [0, *range(2, input.dim())], dtype=running_mean.dtype)
    ones = torch.ones_like(running_mean)
    centered = torch.batch_norm(input, None, None, shift, ones, False, 0.0, 0.0, False)  # x - shift, exactly
    _, sum_sq, total = _batch_norm_backward(
        centered, centered, None, None, None, torch.zeros_like(running_mean), ones, True, 0.0, [False, True, True]
    )
    offset = total.div_(n)
    var = sum_sq.div_(n).addcmul_(offset, offset, value=-1.0).clamp_min_(0.0)
    mean = shift.add_(offset)
    running_mean.lerp_(mean, momentum)
    running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * n / (n - 1))
    return mean, var


class _MomentumBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stats, lam, tau, eps):  # noqa: D102 (see module docstring)
        momentum_mean, momentum_var, running_mean, running_var = stats
        mean, var = _update_batch_stats(input, running_mean, running_var, 1.0 - tau)
        if lam == 0.0:
            torch._foreach_copy_((momentum_mean, momentum_var), (mean, var))
            center, phi = mean, var
        else:
            torch._foreach_lerp_((momentum_mean, momentum_var), (mean, var), 1.0 - lam)
            center, phi = momentum_mean, momentum_var
        output = torch.batch_norm(input, weight, bias, center, phi, False, 0.0, eps, False)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Saved tensors are fresh: a later in-place update of the buffers (module reused
            # within one forward) cannot change what this backward sees.
            ctx.save_for_backward(input, weight, mean, center if lam == 0.0 else center.clone(), (phi + eps).rsqrt_())
            ctx.lam = lam
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        input, weight, mean, center, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.lam == 0.0:  # exactly BN: center == mean, invstd == 1 / sqrt(var + eps)
            grads = _batch_norm_backward(grad_output, input, weight, None, None, mean, invstd, True, 0.0, [need_input, need_weight, need_bias])
            return (*grads, None, None, None, None)
        # grad_weight = sum(g * (x - M)) * s and grad_bias = sum(g), both from one native pass.
        _, grad_weight, grad_bias = _batch_norm_backward(
            grad_output, input, weight, None, None, center, invstd, True, 0.0, [False, True, True]
        )
        grad_input = None
        if need_input:
            k = (1.0 - ctx.lam) / (input.numel() // input.shape[1])
            scale = invstd if weight is None else weight * invstd
            # dx = scale * g + coef_c + coef_x * x with coef_x = -k * u, coef_c = -k * (scale * sum(g) - u * mu)
            u = (grad_weight * invstd).mul_(scale)
            coef_c = (scale * grad_bias).addcmul_(u, mean, value=-1.0).mul_(-k)
            grad_input = torch.batch_norm(grad_output, scale, coef_c, torch.zeros_like(scale), torch.ones_like(scale), False, 0.0, 0.0, False)
            grad_input.addcmul_(input, u.to(input.dtype).view((1, -1) + (1,) * (input.dim() - 2)), value=-k)
        return grad_input, grad_weight if need_weight else None, grad_bias if need_bias else None, None, None, None, None


def momentum_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum_mean: Tensor,
    momentum_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    lam: float,
    tau: float,
    eps: float = 1e-5,
) -> Tensor:
    """Training-mode MBN step; updates the four statistics buffers in place.

    Args:
        input: ``(N, C, *)`` tensor with more than one value per channel.
        weight: affine scale ``(C,)`` or None.
        bias: affine shift ``(C,)`` or None.
        momentum_mean: ``M`` buffer ``(C,)``, updated in place.
        momentum_var: ``Phi`` buffer ``(C,)``, updated in place.
        running_mean: inference mean ``(C,)``, updated in place with momentum ``1 - tau``.
        running_var: inference variance ``(C,)`` (unbiased), updated in place with ``1 - tau``.
        lam: momentum of ``M``/``Phi`` in ``[0, 1)``; 0 gives plain batch normalization.
        tau: momentum of the running statistics, in ``[0, 1]``.
        eps: added to ``Phi`` before the square root.

    Returns:
        The normalized tensor, same shape and dtype as ``input``.
    """
    return _MomentumBatchNormFunction.apply(
        input, weight, bias, (momentum_mean, momentum_var, running_mean, running_var), lam, tau, eps
    )
