"""Training-mode Momentum Batch Normalization: its definition, and the fast path tested against it.

Per channel, over the batch and spatial dims (``n`` values):

    mu, var = batch mean and biased variance
    M   <- lam * M   + (1 - lam) * mu          (buffers; lam == 0 is plain BN)
    Phi <- lam * Phi + (1 - lam) * var
    y   = weight * (x - M) / sqrt(Phi + eps) + bias
    running_mean <- tau * running_mean + (1 - tau) * mu
    running_var  <- tau * running_var  + (1 - tau) * var * n / (n - 1)   (unbiased, as nn.BatchNorm)

:func:`momentum_batch_norm_reference` is these lines as plain torch ops and autograd: the
definition. :func:`momentum_batch_norm` is the fast path the layers use; it takes the same
arguments, and ``tests/nn/test_momentum_batchnorm.py`` checks its outputs, gradients and buffer
updates against the reference (and the reference against ``nn.BatchNorm`` at ``lam = 0`` and
against hand computations). Setting ``layer.impl = "reference"`` runs a layer on the reference.

Gradients flow through this batch's ``mu`` and ``var`` only (scaled by ``1 - lam``); the old ``M``
and ``Phi`` are constants. With ``s = 1 / sqrt(Phi + eps)``, ``k = (1 - lam) / n``:

    dx = weight * s * (g - k * sum(g) - k * s**2 * sum(g * (x - M)) * (x - mu))

Why the fast path is not the reference's chain of elementwise ops: that costs ~8 passes over the
activation plus as many autograd nodes, 1.3x-1.6x the step time of native BN on CPU. Here every pass over the activation is a
native BN kernel:

* ``lam == 0`` (first epoch, ``m >= m0``, first batch): MBN *is* BN, so it runs the native training
  ``native_batch_norm`` (momentum ``1 - tau``) and copies its batch statistics into ``M``/``Phi``.
* ``lam > 0``: ``batch_norm_update_stats`` (batch statistics + running-statistics update, one
  call), eval-mode ``batch_norm`` with ``M``/``Phi`` as its statistics (one pass). The backward is
  one native training-mode ``native_batch_norm_backward`` called with weight ``w / c``, mean ``M``
  and invstd ``s * c`` (``c = sqrt(1 - lam)``): that reproduces every term of ``dx`` above except
  a per-channel constant, added in one in-place pass. The remaining cost over BN is a handful of
  per-channel ops and the Python autograd Function, which dominate at tiny batches.

Under ``torch.compile`` the Function is traced into the graph (no graph break; the compiled layer
matches eager, ``tests/nn/test_compile.py``) and inductor fuses the per-channel ops. ``lam`` only
enters as a factor of tensor arithmetic, so a new ``lam`` (every epoch or step) does not recompile.
That needs torch >= :data:`COMPILE_MIN_TORCH` (:func:`compile_supported`); older torch runs MBN eagerly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mbn.utils.library_internals import foreach_copy_, foreach_lerp

__all__ = ["COMPILE_MIN_TORCH", "compile_supported", "momentum_batch_norm", "momentum_batch_norm_reference"]

# The oldest torch that compiles an MBN model into one graph without recompiling for every new lam
# (tests/nn/test_compile.py, tests/models/test_stack_compile.py; both pass on 2.6.0). Before 2.6
# dynamo bakes a module's float attributes into the graph (torch._dynamo.config.specialize_float
# was True), so each new lam recompiles until the cache limit drops the model back to eager; torch
# 2.3's dynamo also refuses this Function's tuple argument and stacked models' state updates.
COMPILE_MIN_TORCH = (2, 6)

_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


def compile_supported() -> bool:
    """Whether this torch compiles MBN layers as the module docstring says (torch >= :data:`COMPILE_MIN_TORCH`)."""
    return tuple(int(part) for part in torch.__version__.split(".")[:2]) >= COMPILE_MIN_TORCH


class _MomentumBatchNormFunction(torch.autograd.Function):
    """Training-mode MBN with ``0 < lam < 1`` (``lam == 0`` takes the native BN path)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stats, lam, tau, eps):  # noqa: D102 (see module docstring)
        momentum_mean, momentum_var, running_mean, running_var = stats
        mean, var = torch.batch_norm_update_stats(input, running_mean, running_var, 1.0 - tau)
        # Out of place, so the backward sees this step's M/Phi even if the layer runs again first.
        # Under torch.compile: a tensor weight (a number weight recompiles for every new lam), and no
        # plain arithmetic here, which the partitioner would recompute in the backward from the
        # buffers after their update below (silently wrong gradients with inductor).
        weight_new = 1.0 - lam
        if torch.compiler.is_compiling():
            weight_new = torch.ones((), dtype=mean.dtype, device=mean.device).mul_(weight_new)
            weight_new = (weight_new, weight_new)
        center, phi = foreach_lerp((momentum_mean, momentum_var), (mean, var), weight_new)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Arguments of the native backward and of the correction (see backward), kept on ctx:
            # cheaper than save_for_backward, and they are neither inputs nor outputs of the Function.
            # lam only enters as a tensor-times-number factor, which torch.compile keeps symbolic
            # (alpha=/value= arguments would recompile for every new lam); nothing here reads the
            # M/Phi buffers (see above).
            ctx.save_for_backward(input)
            ctx.center = center
            ctx.root = root = math.sqrt(1.0 - lam)
            ctx.invstd = invstd = torch.add(phi, eps).rsqrt_().mul_(root)  # s * c
            ctx.lam = lam
            ctx.shift = torch.sub(mean, center).mul_(invstd)  # c * s * (mu - M)
            ctx.weight = (torch.ones_like(invstd) if weight is None else weight) / root  # w / c
            ctx.scale = torch.mul(ctx.weight, invstd)  # w * s
        foreach_copy_((momentum_mean, momentum_var), (center, phi))
        return torch.batch_norm(input, weight, bias, center, phi, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        return (*batch_share_backward(ctx, grad_output, "MomentumBatchNorm"), None, None, None, None)


def batch_share_backward(ctx: Any, grad_output: Tensor, layer: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(input, weight, bias)`` of ``y = w * (x - center) * s + b`` where ``center`` and the
    variance behind ``s`` take this batch's statistics with weight ``1 - lam`` (MBN's ``M`` and
    ``Phi``; CBN's pooled window), in one native BN backward and one per-channel correction.

    With ``c = sqrt(1 - lam)`` the native training-mode backward called with weight ``w / c``, mean
    ``center`` and invstd ``s * c`` gives every term of the gradient except a per-channel constant::

        dx = native + w * s / n * (lam * sum(g) + c * s * (mu - center) * grad_weight_native)

    and ``grad_weight = sum(g * (x - center)) * s = grad_weight_native / c``, ``grad_bias = sum(g)``.

    Args:
        ctx: the Function's context: ``saved_tensors = (input,)``, ``weight`` (``w / c``), ``center``,
            ``invstd`` (``s * c``), ``lam``, ``shift`` (``c * s * (mu - center)``, or None where the
            variance is taken about ``center`` itself, as CBN's), ``scale`` (``w * s``), ``root`` (``c``).
        grad_output: ``g``.
        layer: the layer's name, for the double-backward error.
    """
    if torch.is_grad_enabled():  # create_graph=True: this backward is not itself differentiable
        raise RuntimeError(f"{layer} does not support double backward (create_graph=True)")
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    (input,) = ctx.saved_tensors
    grad_input, grad_weight_native, grad_bias = _batch_norm_backward(
        grad_output, input, ctx.weight, None, None, ctx.center, ctx.invstd, True, 0.0, [need_input, True, True]
    )
    if need_input:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        correction = grad_bias * ctx.lam
        if ctx.shift is not None:
            correction = correction.addcmul_(ctx.shift, grad_weight_native)
        # 1 / n depends on the shape only: as alpha= it costs no op and no recompile.
        grad_input.add_(correction.mul_(ctx.scale).view(shape), alpha=input.shape[1] / input.numel())
    grad_weight = grad_weight_native.div_(ctx.root) if need_weight else None
    return grad_input, grad_weight, grad_bias if need_bias else None


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
    if lam != 0.0:
        return _MomentumBatchNormFunction.apply(
            input, weight, bias, (momentum_mean, momentum_var, running_mean, running_var), lam, tau, eps
        )
    output, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, 1.0 - tau, eps)
    with torch.no_grad():  # M, Phi = this batch's mean and biased variance
        momentum_mean.copy_(mean)
        torch.pow(invstd, -2, out=momentum_var).sub_(eps).clamp_min_(0.0)
    return output


def momentum_batch_norm_reference(
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
    """Training-mode MBN written directly from the formulas (module docstring): the definition.

    Same arguments, output, gradients and buffer updates as :func:`momentum_batch_norm`, but plain
    elementwise ops and autograd: about 8 passes over the activation and as many autograd nodes.
    For tests and debugging (``layer.impl = "reference"``), not for training speed.

    Args:
        input, weight, bias, momentum_mean, momentum_var, running_mean, running_var, lam, tau, eps:
            as for :func:`momentum_batch_norm`; the four buffers are updated in place.

    Returns:
        The normalized tensor, same shape as ``input``, in the dtype ``input`` and the buffers promote to.
    """
    dims = [0, *range(2, input.dim())]  # everything but the channels
    channel = (1, -1) + (1,) * (input.dim() - 2)  # a (C,) vector broadcast against the input
    n = input.numel() // input.shape[1]
    mu = input.mean(dims)
    var = (input - mu.view(channel)).square().mean(dims)  # biased
    # The old M and Phi are buffers, constants to autograd: gradients flow through mu and var only.
    center = lam * momentum_mean + (1 - lam) * mu
    phi = lam * momentum_var + (1 - lam) * var
    output = (input - center.view(channel)) / torch.sqrt(phi.view(channel) + eps)
    if weight is not None:
        output = output * weight.view(channel)
    if bias is not None:
        output = output + bias.view(channel)
    with torch.no_grad():
        momentum_mean.copy_(center)
        momentum_var.copy_(phi)
        running_mean.copy_(tau * running_mean + (1 - tau) * mu)
        running_var.copy_(tau * running_var + (1 - tau) * var * n / (n - 1))
    return output
