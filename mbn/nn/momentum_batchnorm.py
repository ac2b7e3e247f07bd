"""Momentum Batch Normalization layers (Yong et al., ECCV 2020) and their progress setter."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.nn import schedule as _schedule
from mbn.nn._input_checks import check_input, check_training_batch
from mbn.nn.functional import momentum_batch_norm

__all__ = [
    "MomentumBatchNorm",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
    "mbn_layers",
    "set_progress",
]

# MBN's own state, on top of nn.BatchNorm's keys.
_OWN_BUFFERS = ("momentum_mean", "momentum_var", "momentum_initialized")


class MomentumBatchNorm(nn.Module):
    """Momentum Batch Normalization; base class of the 1d/2d/3d variants.

    Training normalizes with momentum statistics ``M``/``Phi`` that mix this batch's statistics
    with their history (momentum ``lam`` from :mod:`mbn.nn.schedule`); eval mode is exactly
    ``nn.BatchNorm`` with ``running_mean``/``running_var``, which are updated with momentum
    ``tau = tau0 ** (m / m0)`` from the batch mean and unbiased batch variance.
    See :mod:`mbn.nn.functional` for the formulas.

    ``m`` (the normalized batch size in the schedule) is the input's batch dimension at each
    training forward unless ``batch_size`` fixes it. Until :meth:`set_progress` is called, the
    ``"epoch"``/``"iteration"`` schedules give ``lam = 0`` (plain BN). ``M``/``Phi`` are initialized
    from the first training batch (that step uses ``lam = 0``); they live in the state_dict, so a
    resumed run continues exactly. A plain BN state_dict loads with ``strict=True``: the missing MBN
    buffers are then re-initialized from the next batch.

    Deliberately not a ``torch.nn.modules.batchnorm._BatchNorm`` subclass: Lightning's
    ``sync_batchnorm=True`` (``nn.SyncBatchNorm.convert_sync_batchnorm``) would silently replace it
    with plain synchronized BN. MBN normalizes each device's own batch.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.
        ideal_batch_size: ``m0`` of the schedule (``>= 1``).
        tau0: running-statistics momentum at the ideal batch size, in ``[0, 1]``.
        affine: learn a per-channel scale and shift.
        schedule: ``"epoch"`` (lam from the integer epoch), ``"iteration"`` (lam from the
            fractional epoch ``epoch + batch_idx / num_batches``) or ``"fixed"`` (``fixed_lam``).
        fixed_lam: lam for ``schedule="fixed"``, in ``[0, 1)``; must be None otherwise.
        batch_size: fixes ``m``; None takes it from each training input.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
    """

    _input_dims: tuple[int, ...] = ()  # allowed input ranks; empty = any rank >= 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        ideal_batch_size: float = 32,
        tau0: float = 0.9,
        affine: bool = True,
        schedule: str = "epoch",
        fixed_lam: float | None = None,
        batch_size: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
        if schedule not in _schedule.SCHEDULES:
            raise ValueError(f"{name}: schedule must be one of {_schedule.SCHEDULES}, got {schedule!r}")
        if schedule == "fixed":
            if fixed_lam is None:
                raise ValueError(f"{name}: schedule='fixed' needs fixed_lam in [0, 1)")
            if not (isinstance(fixed_lam, (int, float)) and 0.0 <= fixed_lam < 1.0):
                raise ValueError(f"{name}: fixed_lam must be in [0, 1), got {fixed_lam!r}")
        elif fixed_lam is not None:
            raise ValueError(f"{name}: fixed_lam={fixed_lam!r} is only used with schedule='fixed', got schedule={schedule!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"{name}: batch_size must be a positive int or None, got {batch_size!r}")
        # Validates ideal_batch_size (m0 >= 1) and tau0 (in [0, 1]) with the schedule's messages.
        _schedule.tau(1, ideal_batch_size, tau0)

        self.num_features = num_features
        self.eps = float(eps)
        self.ideal_batch_size = ideal_batch_size
        self.tau0 = float(tau0)
        self.affine = affine
        self.schedule = schedule
        self.fixed_lam = None if fixed_lam is None else float(fixed_lam)
        self.batch_size = batch_size

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
        self.register_buffer("momentum_mean", torch.zeros(num_features, **factory))
        self.register_buffer("momentum_var", torch.ones(num_features, **factory))
        self.register_buffer("momentum_initialized", torch.tensor(False, device=device))

        self._epoch: float | None = None  # progress as last given to set_progress
        self._total_epochs: float | None = None
        # lam/tau for (progress, m), recomputed only when either changes (see _update_lam_tau).
        self._last_m: int | None = None  # m of the cached lam/tau: batch_size or the last training batch
        self._cached_lam = 0.0
        self._cached_tau = self.tau0
        if batch_size is not None:
            self._update_lam_tau(batch_size)
        # Python mirror of momentum_initialized, so forward never reads a tensor into Python (that
        # would break torch.compile's graph); kept in sync by reset_running_stats and loading.
        self._initialized = False

    # -- schedule -----------------------------------------------------------------------------
    def set_progress(self, epoch: float, total_epochs: float) -> None:
        """Set the schedule position: 1-based ``epoch`` (may be fractional) of ``total_epochs``.

        ``schedule="epoch"`` uses ``floor(epoch)``, ``"iteration"`` the fractional value and
        ``"fixed"`` ignores it. Raises ValueError for ``epoch < 1`` or ``total_epochs < 1``.

        Args:
            epoch: current epoch, 1-based.
            total_epochs: number of epochs of the run.
        """
        _schedule.check_progress(epoch, total_epochs)
        self._set_progress_unchecked(float(epoch), float(total_epochs))

    def _set_progress_unchecked(self, epoch: float, total_epochs: float) -> None:
        # Store what the schedule uses, so lam/tau stay cached while it does not change.
        if self.schedule == "epoch":
            epoch = float(math.floor(epoch))
        elif self.schedule == "fixed":
            return
        if (epoch, total_epochs) == (self._epoch, self._total_epochs):
            return
        self._epoch = epoch
        self._total_epochs = total_epochs
        if self._last_m is not None:
            self._update_lam_tau(self._last_m)

    def _update_lam_tau(self, m: int) -> None:
        # Runs from set_progress and when m changes, never per step: forward only reads the two
        # cached floats, which torch.compile turns into graph inputs (tracing the schedule's checks
        # in forward would break the graph or recompile whenever the progress changes).
        if self.schedule == "fixed":
            lam = self.fixed_lam
        elif self._epoch is None:
            lam = 0.0
        else:
            lam = _schedule.lam(self._epoch, self._total_epochs, m, self.ideal_batch_size)
        self._cached_lam = lam
        self._cached_tau = _schedule.tau(m, self.ideal_batch_size, self.tau0)
        self._last_m = m

    @property
    def lam(self) -> float:
        """Momentum of ``M``/``Phi`` at the current progress and batch size (for logging).

        Uses ``batch_size`` or the batch size of the last training forward; 0.0 (plain BN) before
        any progress is set, or before the first training forward when ``m`` is not fixed. The very
        first training step uses 0 regardless (it initializes ``M``/``Phi``).
        """
        if self.schedule == "fixed":
            return self.fixed_lam
        if self._last_m is None:
            return 0.0
        return self._cached_lam

    @property
    def tau(self) -> float:
        """Momentum of the running statistics at the current batch size (``tau0`` while ``m`` is unknown)."""
        return self._cached_tau

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)``; see the class docstring."""
        check_input(self, input, self._input_dims)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        check_training_batch(self, input)
        m = input.shape[0] if self.batch_size is None else self.batch_size
        if m != self._last_m:
            self._update_lam_tau(m)
        lam, tau = self._cached_lam, self._cached_tau
        buffers = self._buffers  # direct access: this runs for every layer at every step
        if not self._initialized:
            lam = 0.0
        output = momentum_batch_norm(
            input, self.weight, self.bias, buffers["momentum_mean"], buffers["momentum_var"],
            buffers["running_mean"], buffers["running_var"], lam, tau, self.eps,
        )  # fmt: skip
        buffers["num_batches_tracked"].add_(1)
        if not self._initialized:
            buffers["momentum_initialized"].fill_(True)
            self._initialized = True
        return output

    # -- state --------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Reset running and momentum statistics (momentum ones re-initialize from the next batch)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self.momentum_mean.zero_()
        self.momentum_var.fill_(1)
        self.momentum_initialized.fill_(False)
        self._initialized = False

    def reset_parameters(self) -> None:
        """Reset the statistics and the affine parameters to ``weight = 1``, ``bias = 0``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A plain BN checkpoint lacks MBN's own buffers: keep the current placeholders and mark the
        # momentum statistics uninitialized, so the next training batch initializes them.
        if not all(prefix + name in state_dict for name in _OWN_BUFFERS):
            for name in _OWN_BUFFERS:
                state_dict[prefix + name] = getattr(self, name)
            state_dict[prefix + "momentum_initialized"] = torch.tensor(False)
        if prefix + "num_batches_tracked" not in state_dict:  # very old BN checkpoints
            state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._initialized = bool(self.momentum_initialized)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, ideal_batch_size={self.ideal_batch_size}, tau0={self.tau0}, affine={self.affine}, schedule={self.schedule!r}"
        if self.fixed_lam is not None:
            text += f", fixed_lam={self.fixed_lam}"
        if self.batch_size is not None:
            text += f", batch_size={self.batch_size}"
        return text


class MomentumBatchNorm1d(MomentumBatchNorm):
    """:class:`MomentumBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs (see the base class for Args)."""

    _input_dims = (2, 3)


class MomentumBatchNorm2d(MomentumBatchNorm):
    """:class:`MomentumBatchNorm` for ``(N, C, H, W)`` inputs (see the base class for Args)."""

    _input_dims = (4,)


class MomentumBatchNorm3d(MomentumBatchNorm):
    """:class:`MomentumBatchNorm` for ``(N, C, D, H, W)`` inputs (see the base class for Args)."""

    _input_dims = (5,)


def mbn_layers(model: nn.Module) -> list[MomentumBatchNorm]:
    """All :class:`MomentumBatchNorm` layers of ``model`` (itself included), in module order.

    Cache the list and pass it to :func:`set_progress` to skip the model walk on every batch.

    Args:
        model: any module.

    Returns:
        The MBN layers.
    """
    return [module for module in model.modules() if isinstance(module, MomentumBatchNorm)]


def set_progress(model: nn.Module | Iterable[MomentumBatchNorm], epoch: float, total_epochs: float) -> int:
    """Set the schedule progress on every MBN layer of ``model``.

    Cheap enough for every training batch: one validation, then one attribute write per layer
    (pass the cached list from :func:`mbn_layers` to also skip the ``model.modules()`` walk).

    Args:
        model: a module (searched recursively) or an iterable of MBN layers.
        epoch: current epoch, 1-based; fractional values (``epoch + batch_idx / num_batches``)
            drive ``schedule="iteration"`` layers, ``"epoch"`` layers use the integer part.
        total_epochs: number of epochs of the run (``>= 1``).

    Returns:
        The number of MBN layers updated.

    Raises:
        ValueError: ``epoch < 1``, ``total_epochs < 1`` or a non-finite value.
    """
    epoch, total_epochs = _schedule.check_progress(epoch, total_epochs)
    layers = mbn_layers(model) if isinstance(model, nn.Module) else model
    count = 0
    for layer in layers:
        layer._set_progress_unchecked(epoch, total_epochs)
        count += 1
    return count
