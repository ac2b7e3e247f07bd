"""Independent float64 references for the normalization layers, written directly from the formulas.

Deliberately naive (plain elementwise torch ops + autograd), sharing no code with ``mbn.nn``.
"""

from __future__ import annotations

import torch


def channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast against an input of rank ``dim``."""
    return t.view(1, -1, *([1] * (dim - 2)))


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


class MBNReference:
    """MBN (Yong et al. 2020) from the formulas: the module's state, updated one step at a time."""

    def __init__(self, channels: int, eps: float = 1e-5):
        self.eps = eps
        self.M = torch.zeros(channels, dtype=torch.float64)
        self.Phi = torch.ones(channels, dtype=torch.float64)
        self.running_mean = torch.zeros(channels, dtype=torch.float64)
        self.running_var = torch.ones(channels, dtype=torch.float64)
        self.initialized = False

    def train_step(self, x, weight, bias, lam, tau):
        """Output of one training step (differentiable in x, weight, bias); updates the state."""
        dims = reduce_dims(x)
        n = x.numel() // x.shape[1]
        mu = x.mean(dims)
        var = ((x - channel_view(mu, x.dim())) ** 2).mean(dims)  # biased
        if not self.initialized:  # momentum statistics start from the first batch
            lam = 0.0
            self.initialized = True
        M = lam * self.M + (1 - lam) * mu  # old M, Phi are constants: no gradient through them
        Phi = lam * self.Phi + (1 - lam) * var
        y = (x - channel_view(M, x.dim())) / torch.sqrt(channel_view(Phi, x.dim()) + self.eps)
        if weight is not None:
            y = y * channel_view(weight, x.dim()) + channel_view(bias, x.dim())
        self.M, self.Phi = M.detach(), Phi.detach()
        self.running_mean = tau * self.running_mean + (1 - tau) * mu.detach()
        self.running_var = tau * self.running_var + (1 - tau) * var.detach() * n / (n - 1)
        return y

    def eval_output(self, x, weight, bias):
        y = (x - channel_view(self.running_mean, x.dim())) / torch.sqrt(channel_view(self.running_var, x.dim()) + self.eps)
        if weight is not None:
            y = y * channel_view(weight, x.dim()) + channel_view(bias, x.dim())
        return y


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
