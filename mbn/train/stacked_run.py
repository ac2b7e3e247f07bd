"""K runs that differ only in their seed, trained as one stacked model, each recorded as its single run."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mbn.models import stack
from mbn.train.callbacks import MomentumScheduleCallback, NormLayerGuard
from mbn.train.checkpoint_io import AtomicCheckpointIO
from mbn.train.run_dir import JobPlan, JobRecord, last_checkpoint, verify_checkpoint
from mbn.train.loggers import build_loggers, finish_loggers
from mbn.train.run import (
    RECORDED_EXCEPTIONS,
    build_seeded_model,
    checkpoint_callbacks,
    failure_status,
    fit,
    library_versions,
    log_batch_sizes,
    show_progress_bar,
    signal_handling,
    trainer_options,
    training_module,
)
from mbn.train.spec import RunSpec
from mbn.train.stacked_checkpoint import (
    MemberCheckpoint,
    MemberEpochRecorder,
    check_same_position,
    merge_member_checkpoints,
    split_member_checkpoint,
)
from mbn.train.stacked_datamodule import StackedDataModule
from mbn.train.stacked_module import StackedClassificationModule

log = logging.getLogger("mbn.train")

# RunSpec fields in which the members of a stack may differ: the seed, and what follows from
# the run being another run (its dir, name, recorded config and hash, overrides).
MEMBER_FIELDS = ("seed", "output_dir", "run_name", "config", "config_hash", "overrides")


def check_stackable(specs: Sequence[RunSpec]) -> None:
    """Raise ``ValueError`` unless ``specs`` can train as one stack.

    Args:
        specs: the members' runs.

    Raises:
        ValueError: no runs, runs that differ in another field than :data:`MEMBER_FIELDS` (the
            message names it), two runs in one dir, or several devices (stacks train on one).
    """
    if not specs:
        raise ValueError("train_stack needs at least one run")
    first = specs[0]
    for index, spec in enumerate(specs[1:], 1):
        for field in dataclasses.fields(RunSpec):
            if field.name not in MEMBER_FIELDS and getattr(spec, field.name) != getattr(first, field.name):
                raise ValueError(f"runs of a stack may differ only in {', '.join(MEMBER_FIELDS)}: run {index} has another {field.name} than run 0")
    dirs = [Path(spec.output_dir).resolve() for spec in specs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("every run of a stack needs its own output_dir")
    if first.trainer.world_size > 1:
        raise ValueError(f"stacked runs train on one device for now, got {first.trainer.world_size} devices x nodes")


class _Member:
    """One member's record, loggers and stateful callbacks in a stack.

    Args:
        k: member index.
        spec: the member's run.
        schedule: the stack's MBN schedule callback (shared).
    """

    def __init__(self, k: int, spec: RunSpec, schedule: MomentumScheduleCallback) -> None:
        self.k = k
        self.spec = spec
        self.resume_from = last_checkpoint(spec.output_dir)
        self.record = JobRecord(spec, self.resume_from, rank=rank_zero_only.rank, versions=library_versions())
        self.loggers: list[Logger] = []
        self.recorder = MemberEpochRecorder(
            k, schedule=schedule, on_epoch=self.epoch_done, log_lines=not show_progress_bar(spec), total_epochs=spec.epochs,
        )
        self.checkpoints: list[MemberCheckpoint] = []
        self.steps_per_epoch = 0

    @property
    def callbacks(self) -> list[Callback]:
        """The member's stateful callbacks (their state goes into its checkpoints)."""
        return [self.recorder, *self.checkpoints]

    def epoch_done(self, history: list[dict[str, Any]]) -> None:
        """Write the running results.json and the epoch's metrics (single-run names) to the member's loggers."""
        self.record.write("running", history)
        row = history[-1]
        metrics = {name: row[key] for key, name in _LOGGED.items() if row.get(key) is not None}
        for logger in self.loggers:
            logger.log_metrics({**metrics, "epoch": row["epoch"] - 1}, step=row["epoch"] * self.steps_per_epoch - 1)
            logger.save()


# History column -> the metric name a single run logs it under.
_LOGGED = {"train_loss": "train/loss", "train_acc1": "train/acc1", "lr": "lr", "val_loss": "val/loss", "val_acc1": "val/acc1",
           "val_acc5": "val/acc5", "lam": "mbn/lam", "tau": "mbn/tau"}


class _StepsPerEpoch(Callback):
    """Tells the members how many steps an epoch has (for their loggers' step numbers)."""

    def __init__(self, members: Sequence[_Member]) -> None:
        self.members = members

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for member in self.members:
            member.steps_per_epoch = int(trainer.num_training_batches)


def train_stack(specs: Sequence[RunSpec], callbacks: Sequence[Callback] = ()) -> list[dict[str, Any]]:
    """Train K runs that differ only in their seed as one stacked model; record each as :func:`~mbn.train.train` would.

    Member k starts as its single run (seeded, then built), sees its single run's batches and
    is evaluated on the same test split. Each member's dir ends with what ``train(spec)`` leaves:
    ``results.json`` (through :class:`~mbn.train.run_dir.JobRecord`: status, history, attempts),
    ``checkpoints/last.ckpt`` and ``best.ckpt`` (by its own val/acc1) in the single-run format
    (:mod:`mbn.train.stacked_checkpoint`), and ``csv/version_<n>/metrics.csv`` (one row per
    epoch), TensorBoard events and its own W&B run when configured. A member whose loss
    turns NaN/inf is frozen and ends ``diverged``; the others train on. If every member has a
    ``last.ckpt`` (of its config, at the same epoch) the stack resumes from them; a member of a
    stack can also be resumed alone by ``train(spec)``. Like ``train``, this neither locks nor
    plans the dirs (:func:`~mbn.train.job.run_job` does that for single runs): leave final
    members (completed, diverged) out of a stack.

    Args:
        specs: the members' runs (see :func:`check_stackable`).
        callbacks: extra Lightning callbacks of the stack's trainer.

    Returns:
        Each member's final results (as written to its ``results.json``), in ``specs`` order.

    Raises:
        ValueError: runs that cannot be stacked, or that cannot resume together (some with a
            checkpoint and some without, checkpoints of another config or at different epochs).
    """
    specs = list(specs)
    check_stackable(specs)
    first = specs[0]
    # Checked before any record is written: a refused stack leaves every member's dir as it was.
    resumed = _resumed_checkpoints(specs)
    for spec in specs:
        Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    if first.trainer.num_threads:
        torch.set_num_threads(first.trainer.num_threads)
    schedule = MomentumScheduleCallback()
    members = [_Member(k, spec, schedule) for k, spec in enumerate(specs)]
    for member in members:
        member.record.write("running")
    trainer: pl.Trainer | None = None
    status: str = "failed"
    error: tuple[str, str | None] | None = None
    module: StackedClassificationModule | None = None
    with signal_handling() as in_fit, tempfile.TemporaryDirectory(prefix="mbn-stack-") as scratch:
        try:
            datamodule = StackedDataModule(first.data, [spec.seed for spec in specs], cache_dir=first.cache_dir)
            module = _build_module(specs, datamodule)
            for member in members:
                member.loggers = build_loggers(member.spec, concurrent=True)
                member.checkpoints = checkpoint_callbacks(
                    member.spec.output_dir, MemberCheckpoint, member=member.k, split=_splitter(module, member)
                )
                log_batch_sizes(member.spec, member.loggers)
            ckpt_path = _merged_checkpoint(members, resumed, module, Path(scratch)) if resumed else None
            trainer = pl.Trainer(
                logger=False,
                callbacks=[schedule, _StepsPerEpoch(members), *(m.recorder for m in members), NormLayerGuard(module.model),
                           *callbacks, *(c for m in members for c in m.checkpoints)],
                **trainer_options(first),
            )
            fit(trainer, module, datamodule, ckpt_path, in_fit)
            status = "completed"
        except RECORDED_EXCEPTIONS as exc:
            status, error = failure_status(exc, trainer)
        finally:
            diverged = module.diverged if module is not None else {}
            results = []
            for member in members:
                # Divergence is a member's own end; any other end (completed, failed, ...) is the stack's.
                own_status, own_error = ("diverged", (diverged[member.k], None)) if member.k in diverged else (status, error)
                history = member.recorder.history or None
                results.append(member.record.write(own_status, history, error=own_error, finished=True))
                finish_loggers(member.loggers, exit_code=0 if own_status == "completed" else 1)
    return results


def _resumed_checkpoints(specs: Sequence[RunSpec]) -> list[dict[str, Any]] | None:
    """The members' ``last.ckpt`` (loaded) when every member has one of its config at the same step; None when none has.

    Raises:
        ValueError: some members with a checkpoint and some without, one of another config or
            unloadable (:func:`~mbn.train.run_dir.verify_checkpoint`), or checkpoints at different steps.
    """
    found = [last_checkpoint(spec.output_dir) for spec in specs]
    if all(path is None for path in found):
        return None
    if any(path is None for path in found):
        missing = [str(spec.output_dir) for spec, path in zip(specs, found) if path is None]
        raise ValueError(f"cannot resume a stack of members at different epochs: {', '.join(missing)} has no checkpoint (stands at epoch 0)")
    for spec in specs:
        plan = verify_checkpoint(JobPlan("resume", "stacked"), spec.output_dir, spec.config_hash)
        if plan.action != "resume":
            raise ValueError(f"cannot resume {spec.output_dir} in a stack: {plan.reason}")
    io = AtomicCheckpointIO()
    checkpoints = [io.load_checkpoint(path, map_location="cpu") for path in found]
    check_same_position(checkpoints)
    return checkpoints


def _build_module(specs: Sequence[RunSpec], datamodule: StackedDataModule) -> StackedClassificationModule:
    """Each member's model as its single run builds it (seeded), stacked, in the stack's module."""
    models = [build_seeded_model(spec, datamodule.num_classes, datamodule.in_channels) for spec in specs]
    return training_module(specs[0], stack(models), datamodule.num_classes, StackedClassificationModule)


def _splitter(module: StackedClassificationModule, member: _Member):
    """The function that makes ``member``'s checkpoint out of the stack's."""
    return lambda checkpoint: split_member_checkpoint(checkpoint, module, member.k, member.callbacks, member.spec.config_hash)


def _merged_checkpoint(members: Sequence[_Member], checkpoints: Sequence[dict[str, Any]], module: StackedClassificationModule,
                       scratch: Path) -> Path:
    """Write the stack's checkpoint merged from the members' ``last.ckpt`` to ``scratch``; its path."""
    merged = merge_member_checkpoints(checkpoints, module, [member.callbacks for member in members])
    path = scratch / "stack.ckpt"
    AtomicCheckpointIO().save_checkpoint(merged, path)
    for member in members:
        log.info("resuming %s from %s (in a stack of %d)", member.spec.run_name, member.resume_from, len(members))
    return path
