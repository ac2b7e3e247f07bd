"""Independent float64 references for the normalization layers, written directly from the formulas.

Deliberately naive (plain elementwise torch ops + autograd), sharing no code with ``mbn.nn``. MBN's
reference is part of ``mbn.nn`` (``mbn.nn.functional.momentum_batch_norm_reference``, the
definition the fast path is tested against); the MBN tests check it against nn.BatchNorm and by hand.
"""

from __future__ import annotations

import torch


def channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast against an input of rank ``dim``."""
    return t.view(1, -1, *([1] * (dim - 2)))


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def batch_renorm_reference(x, weight, bias, running_mean, running_var, r_max, d_max, eps):
    """Batch Renormalization (Ioffe 2017) training output; r and d are constants (no gradient)."""
    dims = reduce_dims(x)
    mu = x.mean(dims)
    sigma_b = torch.sqrt(((x - channel_view(mu, x.dim())) ** 2).mean(dims) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_b.detach() / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu.detach() - running_mean) / sigma, -d_max, d_max)
    x_hat = (x - channel_view(mu, x.dim())) / channel_view(sigma_b, x.dim())
    y = x_hat * channel_view(r, x.dim()) + channel_view(d, x.dim())
    return y * channel_view(weight, x.dim()) + channel_view(bias, x.dim())
