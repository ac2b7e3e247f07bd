"""Batch Renormalization (Ioffe, NeurIPS 2017)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mbn.nn._batch_stats_norm import BatchStatsNorm
from mbn.nn._input_checks import check_int, check_number

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class BatchRenorm(BatchStatsNorm):
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

    Not a ``_BatchNorm`` subclass, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves it alone
    (see :class:`~mbn.nn._batch_stats_norm.BatchStatsNorm`).

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
        super().__init__(num_features, eps, affine, device, dtype)  # validates num_features and eps
        name = type(self).__name__
        check_number(name, "momentum", momentum, 0.0, 1.0)
        check_number(name, "r_max", r_max, 1.0)
        check_number(name, "d_max", d_max, 0.0)
        for arg, value in (("warmup_steps", warmup_steps), ("r_max_ramp_steps", r_max_ramp_steps), ("d_max_ramp_steps", d_max_ramp_steps)):
            check_int(name, arg, value, 0)
        self.momentum = float(momentum)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps = r_max_ramp_steps
        self.d_max_ramp_steps = d_max_ramp_steps
        # Python mirror of num_batches_tracked, the ramp's step (see BatchStatsNorm._sync_with_buffers);
        # the buffer is fresh, so no device read here.
        self._step = 0

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

    def _clip_limits(self) -> tuple[float | Tensor, float | Tensor]:
        """``(r_max, d_max)`` for this training step: :meth:`limits` at the layer's step.

        A hook for layers that hold several runs' channels (:mod:`mbn.models.stacked_layers`):
        they return per-channel tensors when their runs stand at different steps.
        """
        return self.limits(self._step)

    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        r_max, d_max = self._clip_limits()
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
        self._step += 1  # the base class counts num_batches_tracked
        return output

    def _sync_with_buffers(self) -> None:
        self._step = int(self.num_batches_tracked)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, r_max={self.r_max}, "
            f"d_max={self.d_max}, warmup_steps={self.warmup_steps}, r_max_ramp_steps={self.r_max_ramp_steps}, "
            f"d_max_ramp_steps={self.d_max_ramp_steps}"
        )


class BatchRenorm1d(BatchRenorm, input_rank=1):
    """:class:`BatchRenorm` for ``(N, C)`` or ``(N, C, L)`` inputs (see the base class for Args)."""


class BatchRenorm2d(BatchRenorm, input_rank=2):
    """:class:`BatchRenorm` for ``(N, C, H, W)`` inputs (see the base class for Args)."""


class BatchRenorm3d(BatchRenorm, input_rank=3):
    """:class:`BatchRenorm` for ``(N, C, D, H, W)`` inputs (see the base class for Args)."""
