"""Callbacks of a training run: the MBN schedule's log, and the per-epoch record that feeds results.json."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from mbn.nn import BatchRenorm, EvoNormB0, EvoNormS0, FilterResponseNorm, GroupNorm, MomentumBatchNorm
from mbn.models.stacked_optim import member_lr
from mbn.nn.convert import TORCH_BATCH_NORMS
from mbn.train.stacked_module import member_metric

log = logging.getLogger("mbn.train")

# Layers whose class must survive the strategy's model wrapping (SyncBatchNorm counts too: it must not appear).
NORM_CLASSES = (
    MomentumBatchNorm, BatchRenorm, GroupNorm, EvoNormB0, EvoNormS0, FilterResponseNorm, *TORCH_BATCH_NORMS, torch.nn.GroupNorm
)


class MomentumScheduleCallback(Callback):
    """Log the MBN schedule: ``mbn/lam`` and ``mbn/tau`` at every epoch end.

    The schedule itself is the module's (:class:`~mbn.train.module.ClassificationModule` sets the
    layers' progress at every training batch start), so a Trainer without this callback still
    trains MBN right. Logs nothing for models without MBN layers.
    """

    def __init__(self) -> None:
        self.module: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.module = pl_module

    def values(self) -> dict[str, float]:
        """Current ``lam`` and ``tau`` (empty without MBN layers)."""
        schedule_values = getattr(self.module, "schedule_values", None)
        return schedule_values() if schedule_values is not None else {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self.values()
        if values:
            pl_module.log_dict({f"mbn/{k}": v for k, v in values.items()}, on_step=False, on_epoch=True)


class EpochRecorder(Callback):
    """Collect one history row per finished epoch; log epoch-level training metrics.

    A row holds ``epoch`` (1-based), ``train_loss``, ``train_acc1``, ``val_loss``, ``val_acc1``,
    ``val_acc5`` (the validation split's; null without one), ``test_loss``, ``test_acc1``,
    ``test_acc5``, ``lr`` (at the epoch's start), ``lam``, ``tau`` and ``time_s``. The history is part
    of the checkpoint (callback state), so a resumed run keeps the rows of the epochs before the
    interruption.

    Args:
        schedule: the MBN schedule callback whose lam/tau go into each row (None = no MBN columns).
        on_epoch: called with the full history after each epoch (e.g. to write a running results.json).
        log_lines: log one plain line per epoch (used when there is no progress bar).
        total_epochs: for the log line.
        member: the run's index in a stack (None for a single run): it reads and logs its metrics
            under :func:`~mbn.train.stacked_module.member_metric` names (the stack's module logs
            every member's), records no row once the member has diverged, and keeps its own state.
    """

    def __init__(
        self,
        schedule: MomentumScheduleCallback | None = None,
        on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
        log_lines: bool = True,
        total_epochs: int | None = None,
        member: int | None = None,
    ) -> None:
        self.schedule = schedule
        self.on_epoch = on_epoch
        self.log_lines = log_lines
        self.total_epochs = total_epochs
        self.member = member
        self.metric_prefix = member_metric(member, "") if member is not None else ""
        self.history: list[dict[str, Any]] = []
        self._epoch_start = 0.0
        self._epoch_lr: float | None = None

    @property
    def single_state_key(self) -> str:
        """The key of a single run's recorder state in its checkpoints."""
        return type(self).__qualname__

    @property
    def state_key(self) -> str:
        return self.single_state_key if self.member is None else f"{self.single_state_key}[member {self.member}]"

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_lr = member_lr(trainer.optimizers[0], self.member) if trainer.optimizers else None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.member in getattr(pl_module, "diverged", {}):
            return  # a diverged run records no row for the epoch it diverged in, nor any later
        prefix = self.metric_prefix
        every = pl_module.train_epoch_metrics() if hasattr(pl_module, "train_epoch_metrics") else {}
        train = {key[len(prefix):]: value for key, value in every.items() if key.startswith(prefix)}
        logged = dict(train)
        if self._epoch_lr is not None:
            logged["lr"] = self._epoch_lr
        pl_module.log_dict({prefix + key: value for key, value in logged.items()}, on_step=False, on_epoch=True)
        metrics = {key[len(prefix):]: value for key, value in trainer.callback_metrics.items() if key.startswith(prefix)}
        schedule = self.schedule.values() if self.schedule is not None else {}
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": train.get("train/loss"),
            "train_acc1": train.get("train/acc1"),
            "val_loss": _number(metrics.get("val/loss")),
            "val_acc1": _number(metrics.get("val/acc1")),
            "val_acc5": _number(metrics.get("val/acc5")),
            "test_loss": _number(metrics.get("test/loss")),
            "test_acc1": _number(metrics.get("test/acc1")),
            "test_acc5": _number(metrics.get("test/acc5")),
            "lr": self._epoch_lr,
            "lam": schedule.get("lam"),
            "tau": schedule.get("tau"),
            "time_s": round(time.perf_counter() - self._epoch_start, 3),
        }
        self.history.append(row)
        if self.log_lines and trainer.is_global_zero:
            log.info(prefix + _format_row(row, self.total_epochs))
        if self.on_epoch is not None and trainer.is_global_zero:
            self.on_epoch(self.history)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _format_row(row: dict[str, Any], total_epochs: int | None) -> str:
    parts = [f"epoch {row['epoch']}" + (f"/{total_epochs}" if total_epochs else "")]
    for key, fmt in (("train_loss", ".4f"), ("train_acc1", ".2%"), ("val_loss", ".4f"), ("val_acc1", ".2%"),
                     ("test_loss", ".4f"), ("test_acc1", ".2%"), ("lr", ".4g"), ("lam", ".3f"), ("tau", ".3f")):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:{fmt}}")
    parts.append(f"({row['time_s']:.1f} s)")
    return "  ".join(parts)


class InjectedFailure(RuntimeError):
    """The failure :class:`FailAtEpoch` raises (``debug.fail_at_epoch``; tests of sweeps only)."""


class FailAtEpoch(Callback):
    """Fault injection for tests: raise :class:`InjectedFailure` when epoch ``epoch`` (1-based) starts.

    The epochs before it finish and are checkpointed, so a rerun without the injection resumes.

    Args:
        epoch: the epoch that fails.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            raise InjectedFailure(f"debug.fail_at_epoch={self.epoch}: injected failure at the start of epoch {self.epoch}")


# The longest a held run waits for its signal before it carries on (a test that never sends one).
HOLD_SECONDS = 120.0


class HoldAtEpoch(Callback):
    """Fault injection for tests: wait when epoch ``epoch`` (1-based) starts, until SIGINT or SIGTERM.

    The epochs before it are finished and checkpointed, so a test that signals the run then knows
    where it stopped. SIGINT raises ``KeyboardInterrupt`` in the wait; SIGTERM sets Lightning's
    ``received_sigterm``, which ends the wait, and Lightning stops after the next batch.

    Args:
        epoch: the epoch that waits.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 != self.epoch:
            return
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline and not getattr(trainer, "received_sigterm", False):
            time.sleep(0.02)


def norm_layer_counts(module: torch.nn.Module) -> dict[str, int]:
    """How many modules of each normalization class ``module`` holds (class name -> count)."""
    counts: dict[str, int] = {}
    for layer in module.modules():
        if isinstance(layer, NORM_CLASSES):
            name = type(layer).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


class NormLayerGuard(Callback):
    """Fail the run if the strategy replaced any normalization layer (e.g. ``sync_batchnorm``).

    MBN and BRN normalize each device's own batch of m samples: the quantity the study varies.
    The layer classes are counted when the callback is built and again once the strategy has
    wrapped the model (DDP), right before training starts.

    Args:
        model: the network as built.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.expected = norm_layer_counts(model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = trainer.strategy.model if trainer.strategy.model is not None else pl_module
        found = norm_layer_counts(wrapped)
        if found != self.expected:
            raise RuntimeError(f"normalization layers changed when the strategy wrapped the model: built {self.expected}, training {found}")
