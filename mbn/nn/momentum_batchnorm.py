"""Momentum Batch Normalization layers (Yong et al., ECCV 2020) and their progress setter."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from mbn.nn import schedule as _schedule
from mbn.nn._batch_stats_norm import BatchStatsNorm
from mbn.nn.functional import momentum_batch_norm, momentum_batch_norm_reference
from mbn.utils.library_internals import own_buffers

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

# The training step per MomentumBatchNorm.impl: same arguments, same results (tested).
_TRAINING_STEPS = {"fast": momentum_batch_norm, "reference": momentum_batch_norm_reference}


class MomentumBatchNorm(BatchStatsNorm):
    """Momentum Batch Normalization; base class of the 1d/2d/3d variants.

    Training normalizes with momentum statistics ``M``/``Phi`` that mix this batch's statistics
    with their history (momentum ``lam`` from :mod:`mbn.nn.schedule`); eval mode is exactly
    ``nn.BatchNorm`` with ``running_mean``/``running_var``, which are updated with momentum
    ``tau = tau0 ** (m / m0)`` from the batch mean and unbiased batch variance.
    See :mod:`mbn.nn.functional` for the formulas and their reference implementation
    (:attr:`impl`).

    ``m`` (the normalized batch size in the schedule) is the input's batch dimension at each
    training forward unless ``batch_size`` fixes it. Until :meth:`set_progress` is called, the
    ``"epoch"``/``"iteration"`` schedules give ``lam = 0`` (plain BN). ``M``/``Phi`` are initialized
    from the first training batch (that step uses ``lam = 0``); they live in the state_dict, so a
    resumed run continues exactly. A plain BN state_dict loads with ``strict=True``: the missing MBN
    buffers are then re-initialized from the next batch.

    Not a ``_BatchNorm`` subclass, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves it alone:
    MBN normalizes each device's own batch (see :class:`~mbn.nn._batch_stats_norm.BatchStatsNorm`).

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
        super().__init__(num_features, eps, affine, device, dtype)  # validates num_features and eps
        name = type(self).__name__
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

        self.ideal_batch_size = ideal_batch_size
        self.tau0 = float(tau0)
        self.schedule = schedule
        self.fixed_lam = None if fixed_lam is None else float(fixed_lam)
        self.batch_size = batch_size
        self.impl = "fast"

        self.register_buffer("momentum_mean", torch.zeros_like(self.running_mean))
        self.register_buffer("momentum_var", torch.ones_like(self.running_var))
        self.register_buffer("momentum_initialized", torch.tensor(False, device=self.running_mean.device))

        self._epoch: float | None = None  # progress as last given to set_progress
        self._total_epochs: float | None = None
        # lam/tau for (progress, m), derived only in _update_lam_tau and only when either changes.
        self._update_lam_tau(batch_size)
        # Python mirror of momentum_initialized (see BatchStatsNorm._sync_with_buffers); the
        # buffer is fresh, so no device read here.
        self._initialized = False

    # -- implementation -----------------------------------------------------------------------
    @property
    def impl(self) -> str:
        """Training-step implementation: ``"fast"`` (default) or ``"reference"``.

        ``"fast"`` runs :func:`~mbn.nn.functional.momentum_batch_norm`; ``"reference"`` runs
        :func:`~mbn.nn.functional.momentum_batch_norm_reference`, the formulas as plain torch ops
        (the definition; slow, for tests and debugging). Both give the same outputs, gradients
        and buffers; eval mode is the same either way. Not part of the state_dict.
        """
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in _TRAINING_STEPS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {tuple(_TRAINING_STEPS)}, got {value!r}")
        self._impl = value

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
        self._update_lam_tau(self._last_m)

    def _update_lam_tau(self, m: int | None) -> None:
        # The one place lam/tau are derived. Runs from __init__, set_progress and when m changes,
        # never per step: forward only reads the two cached floats, which torch.compile turns into
        # graph inputs (tracing the schedule's checks in forward would break the graph or
        # recompile whenever the progress changes). m is None until the first training forward
        # when batch_size does not fix it.
        if self.schedule == "fixed":
            lam = self.fixed_lam
        elif self._epoch is None or m is None:
            lam = 0.0
        else:
            lam = _schedule.lam(self._epoch, self._total_epochs, m, self.ideal_batch_size)
        self._cached_lam = lam
        self._cached_tau = self.tau0 if m is None else _schedule.tau(m, self.ideal_batch_size, self.tau0)
        self._last_m = m  # m of the cached lam/tau: batch_size or the last training batch

    @property
    def lam(self) -> float:
        """Momentum of ``M``/``Phi`` at the current progress and batch size (for logging).

        Uses ``batch_size`` or the batch size of the last training forward; 0.0 (plain BN) before
        any progress is set, or before the first training forward when ``m`` is not fixed. The very
        first training step uses 0 regardless (it initializes ``M``/``Phi``).
        """
        return self._cached_lam

    @property
    def tau(self) -> float:
        """Momentum of the running statistics at the current batch size (``tau0`` while ``m`` is unknown)."""
        return self._cached_tau

    # -- forward ------------------------------------------------------------------------------
    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        m = input.shape[0] if self.batch_size is None else self.batch_size
        if m != self._last_m:
            self._update_lam_tau(m)
        lam = self._cached_lam if self._initialized else 0.0  # the first batch initializes M/Phi
        buffers = own_buffers(self)  # direct access: this runs for every layer at every step
        output = _TRAINING_STEPS[self._impl](
            input, self.weight, self.bias, buffers["momentum_mean"], buffers["momentum_var"],
            buffers["running_mean"], buffers["running_var"], lam, self._cached_tau, self.eps,
        )  # fmt: skip
        if not self._initialized:
            buffers["momentum_initialized"].fill_(True)
            self._initialized = True
        return output

    # -- state --------------------------------------------------------------------------------
    def _reset_own_buffers(self) -> None:
        # The momentum statistics re-initialize from the next batch.
        self.momentum_mean.zero_()
        self.momentum_var.fill_(1)
        self.momentum_initialized.fill_(False)

    def _sync_with_buffers(self) -> None:
        self._initialized = bool(self.momentum_initialized)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A plain BN checkpoint lacks MBN's own buffers: keep the current placeholders and mark the
        # momentum statistics uninitialized, so the next training batch initializes them.
        if not all(prefix + name in state_dict for name in _OWN_BUFFERS):
            for name in _OWN_BUFFERS:
                state_dict[prefix + name] = getattr(self, name)
            state_dict[prefix + "momentum_initialized"] = torch.tensor(False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, ideal_batch_size={self.ideal_batch_size}, tau0={self.tau0}, affine={self.affine}, schedule={self.schedule!r}"
        if self.fixed_lam is not None:
            text += f", fixed_lam={self.fixed_lam}"
        if self.batch_size is not None:
            text += f", batch_size={self.batch_size}"
        if self._impl != "fast":
            text += f", impl={self._impl!r}"
        return text


class MomentumBatchNorm1d(MomentumBatchNorm, input_rank=1):
    """:class:`MomentumBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs (see the base class for Args)."""


class MomentumBatchNorm2d(MomentumBatchNorm, input_rank=2):
    """:class:`MomentumBatchNorm` for ``(N, C, H, W)`` inputs (see the base class for Args)."""


class MomentumBatchNorm3d(MomentumBatchNorm, input_rank=3):
    """:class:`MomentumBatchNorm` for ``(N, C, D, H, W)`` inputs (see the base class for Args)."""


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
