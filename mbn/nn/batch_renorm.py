"""Batch Renormalization (Ioffe, NeurIPS 2017)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.nn._input_checks import check_input, check_training_batch

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class BatchRenorm(nn.Module):
    """Batch Renormalization; base class of the 1d/2d/3d variants.

    Training, per channel with ``sigma_B = sqrt(var_B + eps)`` and ``sigma = sqrt(running_var + eps)``:

        r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    with ``r`` and ``d`` treated as constants (no gradient). The running statistics are then
    updated as in ``nn.BatchNorm`` (``momentum``, unbiased variance); eval mode is exactly
    ``nn.BatchNorm`` with them. The limits ramp linearly with the training step (the paper keeps
    plain BN for ``warmup_steps``, then relaxes the limits): ``r_max`` from 1 to ``r_max`` over
    ``r_max_ramp_steps`` and ``d_max`` from 0 to ``d_max`` over ``d_max_ramp_steps``. The step is
    ``num_batches_tracked``, so a resumed run continues the ramp. ``r_max=1, d_max=0`` is plain BN.

    Not a ``_BatchNorm`` subclass, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves it alone.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances before the square root.
        momentum: running-statistics momentum (PyTorch convention: weight of the new batch).
        affine: learn a per-channel scale and shift.
        r_max: final upper limit of ``r`` (``>= 1``).
        d_max: final limit of ``|d|`` (``>= 0``).
        warmup_steps: training steps with ``r_max = 1``, ``d_max = 0`` before the ramps start.
        r_max_ramp_steps: steps over which ``r_max`` ramps from 1 to its final value (0 = at once).
        d_max_ramp_steps: steps over which ``d_max`` ramps from 0 to its final value (0 = at once).
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
    """

    _input_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        r_max_ramp_steps: int = 5000,
        d_max_ramp_steps: int = 5000,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        checks = {
            "eps": (eps, 0.0, math.inf),
            "momentum": (momentum, 0.0, 1.0),
            "r_max": (r_max, 1.0, math.inf),
            "d_max": (d_max, 0.0, math.inf),
        }
        for arg, (value, low, high) in checks.items():
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name}: {arg} must be a finite number in [{low:g}, {high:g}], got {value!r}")
        for arg, value in (("warmup_steps", warmup_steps), ("r_max_ramp_steps", r_max_ramp_steps), ("d_max_ramp_steps", d_max_ramp_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {arg} must be an int >= 0, got {value!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = affine
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps = r_max_ramp_steps
        self.d_max_ramp_steps = d_max_ramp_steps

        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self._step: int | None = None  # python mirror of num_batches_tracked (no device sync per step)

    def limits(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` in effect at training step ``step`` (0-based).

        Args:
            step: number of training steps already taken.

        Returns:
            The two clipping limits.
        """
        ramp = step - self.warmup_steps
        if ramp < 0:
            return 1.0, 0.0
        r_frac = 1.0 if ramp >= self.r_max_ramp_steps else ramp / self.r_max_ramp_steps
        d_frac = 1.0 if ramp >= self.d_max_ramp_steps else ramp / self.d_max_ramp_steps
        return 1.0 + (self.r_max - 1.0) * r_frac, self.d_max * d_frac

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)``; see the class docstring."""
        check_input(self, input, self._input_dims)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        check_training_batch(self, input)
        if self._step is None:
            self._step = int(self.num_batches_tracked)
        r_max, d_max = self.limits(self._step)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var + self.eps)
            old_running_mean = self.running_mean.clone()
            # One native pass: batch mean/biased variance, and the running-stat update.
            mean, var = torch.batch_norm_update_stats(input, self.running_mean, self.running_var, self.momentum)
            r = torch.sqrt(var + self.eps).div_(running_std).clamp_(1.0 / r_max, r_max)
            d = (mean - old_running_mean).div_(running_std).clamp_(-d_max, d_max)
        # weight * (x_hat * r + d) + bias == x_hat * (weight * r) + (weight * d + bias): the native
        # training-mode batch_norm then gives the exact gradients (r, d are constants).
        if self.affine:
            scale, shift = self.weight * r, torch.addcmul(self.bias, self.weight, d)
        else:
            scale, shift = r, d
        output = F.batch_norm(input, None, None, scale, shift, True, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        self._step += 1
        return output

    def reset_running_stats(self) -> None:
        """Reset the running statistics and the ramp step."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self._step = 0

    def reset_parameters(self) -> None:
        """Reset the statistics and the affine parameters to ``weight = 1``, ``bias = 0``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "num_batches_tracked" not in state_dict:  # very old BN checkpoints
            state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._step = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, r_max={self.r_max}, "
            f"d_max={self.d_max}, warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
            f"d_max_ramp_steps={self.d_max_ramp_steps}"
        )


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C)`` or ``(N, C, L)`` inputs (see the base class for Args)."""

    _input_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, H, W)`` inputs (see the base class for Args)."""

    _input_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, D, H, W)`` inputs (see the base class for Args)."""

    _input_dims = (5,)
