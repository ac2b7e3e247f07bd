"""A job's training end to end, one lifecycle for K >= 1 runs (a single run is a stack of one): build
the data, the module and one Trainer, fit (resuming from ``last.ckpt``), and record each run's
``results.json``, checkpoints and logs in its own dir."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

import mbn
from mbn.models import build_model, set_conv_paths, stack
from mbn.nn import norm_layer
from mbn.train.callbacks import EpochRecorder, MomentumScheduleCallback, NormLayerGuard
from mbn.train.checkpoint_io import AtomicCheckpointIO, MemberCheckpointIO
from mbn.train.ddp_buffers import PerDeviceMomentumStats
from mbn.train.datamodule import ImageDataModule
from mbn.train.loggers import build_loggers, dashboard_callbacks, finish_loggers
from mbn.train.module import ClassificationModule, DivergedError
from mbn.train.optim import MEMBER_OPTIM_FIELDS, member_optim_difference
from mbn.train.run_dir import CHECKPOINT_DIR, CHECKPOINT_HASH_KEY, JobPlan, JobRecord, disk_full_message, last_checkpoint, verify_checkpoint
from mbn.train.spec import RunSpec
from mbn.train.stacked_checkpoint import (
    check_same_position,
    checkpoint_settings,
    member_checkpoints,
    merge_member_checkpoints,
    split_member_checkpoint,
)
from mbn.train.stacked_datamodule import StackedDataModule
from mbn.train.stacked_module import StackedClassificationModule
from mbn.utils.io import is_disk_full

log = logging.getLogger("mbn.train")


class RunInterrupted(BaseException):
    """SIGTERM outside ``trainer.fit`` (inside it Lightning raises its own ``SIGTERMException``)."""


def build_seeded_model(spec: RunSpec, num_classes: int, in_channels: int, steps_per_epoch: int | None = None) -> torch.nn.Module:
    """The run's network, initialized from ``spec.seed`` (seeds every generator first).

    A stacked run builds each member with this, so member k starts exactly as its single run.

    Args:
        spec: the run.
        num_classes: classes of the dataset.
        in_channels: image channels of the dataset.
        steps_per_epoch: training steps per epoch, for norm options given in epochs (BRN's ramps, CBN's burn-in).
    """
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    return build_model(
        spec.model.name,
        num_classes=num_classes,
        norm_layer=norm_layer(spec.norm.name, **spec.norm_options(steps_per_epoch)),
        width=spec.model.width,
        in_channels=in_channels,
        **spec.model.options,
    )


def training_module(spec: RunSpec, model: torch.nn.Module, num_classes: int,
                    cls: type[ClassificationModule] = ClassificationModule) -> ClassificationModule:
    """The LightningModule that trains ``model`` as ``spec`` says (compiled in place when it says so).

    Args:
        spec: the run.
        model: the network.
        num_classes: classes of the dataset.
        cls: the module class (a stacked run's is a subclass).
    """
    if spec.trainer.compile:
        model.compile()
    return cls(
        model,
        spec.optim,
        global_batch_size=spec.global_batch_size,
        num_classes=num_classes,
        check_finite_every_n_steps=spec.trainer.check_finite_every_n_steps,
        total_epochs=spec.epochs,
        eval_splits=spec.data.eval_splits,
    )


def show_progress_bar(spec: RunSpec) -> bool:
    """Lightning's progress bar when configured so, else only on an interactive terminal."""
    if spec.trainer.progress_bar is not None:
        return spec.trainer.progress_bar
    return sys.stdout.isatty()


def trainer_options(spec: RunSpec) -> dict[str, Any]:
    """The ``pl.Trainer`` arguments a run's settings decide (all but callbacks, loggers and plugins).

    Args:
        spec: the run (for a stack: any member, they share these settings).
    """
    progress_bar = show_progress_bar(spec)
    return dict(
        max_epochs=spec.epochs,
        accelerator=spec.trainer.accelerator,
        devices=spec.trainer.devices,
        num_nodes=spec.trainer.num_nodes,
        strategy=spec.trainer.strategy,
        precision=spec.trainer.precision,
        benchmark=spec.trainer.benchmark,
        # MBN/BRN normalize each device's own batch: never convert norm layers to SyncBatchNorm.
        sync_batchnorm=False,
        # TensorBatchLoader splits the data between ranks itself.
        use_distributed_sampler=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=progress_bar,
        num_sanity_val_steps=0,
        # Metrics are logged once per epoch; keep Lightning from flushing per-step rows.
        log_every_n_steps=1_000_000,
        default_root_dir=spec.output_dir,
    )


def build_trainer(spec: RunSpec, callbacks: Sequence[Callback], checkpoint_io: AtomicCheckpointIO | None = None) -> pl.Trainer:
    """The Lightning Trainer of a job (one run or a stack of them).

    The Trainer has no logger: each member's epoch rows reach its own loggers from its
    :class:`Member` (so one member of a stack logs exactly what its single run logs).

    Args:
        spec: the run (for a stack: any member).
        callbacks: every callback (the members' checkpoint callbacks included).
        checkpoint_io: how checkpoints are written (default: :class:`AtomicCheckpointIO`, whole).
    """
    # Checkpoints are written temp + rename and loaded weights-only.
    plugins: list = [checkpoint_io or AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Time limits are handled by the launcher (submitit requeues the job, which resumes from
        # last.ckpt); Lightning's own SIGUSR1 requeue would race it.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(logger=False, callbacks=list(callbacks), plugins=plugins, **trainer_options(spec))


# RunSpec fields in which the members of a stack may differ: the seed, and what follows from
# the run being another run (its dir, name, recorded config and hash, overrides); and of its
# optimizer settings, MEMBER_OPTIM_FIELDS (base_lr, weight_decay).
MEMBER_FIELDS = ("seed", "output_dir", "run_name", "config", "config_hash", "overrides")


def check_stackable(specs: Sequence[RunSpec]) -> None:
    """Raise ``ValueError`` unless ``specs`` can train as one job (any single run can).

    Members may differ in their seed and in ``optim.base_lr`` / ``optim.weight_decay`` (each trains
    at its own, see :class:`~mbn.models.MemberSGD`).

    Args:
        specs: the members' runs.

    Raises:
        ValueError: no runs; for several: runs that differ in another field than
            :data:`MEMBER_FIELDS` (the message names it), two runs in one dir, or several devices
            (stacks train on one).
    """
    if not specs:
        raise ValueError("train_stack needs at least one run")
    first = specs[0]
    if len(specs) == 1:
        return
    for index, spec in enumerate(specs[1:], 1):
        for field in dataclasses.fields(RunSpec):
            mine, theirs = getattr(spec, field.name), getattr(first, field.name)
            differs = member_optim_difference(theirs, mine) is not None if field.name == "optim" else mine != theirs
            if field.name not in MEMBER_FIELDS and differs:
                allowed = ", ".join([*MEMBER_FIELDS, *(f"optim.{key}" for key in MEMBER_OPTIM_FIELDS)])
                raise ValueError(f"runs of a stack may differ only in {allowed}: run {index} has another {field.name} than run 0")
    dirs = [Path(spec.output_dir).resolve() for spec in specs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("every run of a stack needs its own output_dir")
    if first.trainer.world_size > 1:
        raise ValueError(f"stacked runs train on one device for now, got {first.trainer.world_size} devices x nodes")


class Member:
    """One run of a job (a single run is a stack of one): its record, loggers and stateful callbacks.

    Member ``k`` of a stack reads its metrics under :func:`~mbn.train.stacked_module.member_metric`
    names and saves its share of the stack's checkpoints (:mod:`mbn.train.stacked_checkpoint`); a
    single run's are the whole. Either way its dir ends with what a single run leaves.

    Args:
        k: member index.
        spec: the member's run.
        schedule: the job's MBN schedule callback (shared).
        stacked: the job trains several members as one stacked model.
    """

    def __init__(self, k: int, spec: RunSpec, schedule: MomentumScheduleCallback, stacked: bool) -> None:
        self.k = k
        self.spec = spec
        self.stacked = stacked
        self.resume_from = last_checkpoint(spec.output_dir)
        self.record = JobRecord(spec, self.resume_from, rank=rank_zero_only.rank, versions=library_versions())
        self.loggers: list[Logger] = []
        self.recorder = EpochRecorder(
            schedule, on_epoch=self.epoch_done, log_lines=not show_progress_bar(spec), total_epochs=spec.epochs,
            member=k if stacked else None,
        )
        self.checkpoints: list[ModelCheckpoint] = []
        self.dashboards: list[Callback] = []
        self.steps_per_epoch = 0

    @property
    def stateful_callbacks(self) -> list[Callback]:
        """The member's stateful callbacks (their state goes into its checkpoints)."""
        return [self.recorder, *self.checkpoints]

    @property
    def callbacks(self) -> list[Callback]:
        """Every callback of the member, for the job's Trainer."""
        return [*self.stateful_callbacks, *self.dashboards]

    def attach(self, module: ClassificationModule) -> None:
        """Open the member's loggers and build its checkpoint and dashboard callbacks for ``module``."""
        self.loggers = build_loggers(self.spec, concurrent=self.stacked)
        dirpath = Path(self.spec.output_dir) / CHECKPOINT_DIR
        if self.stacked:
            self.checkpoints = member_checkpoints(dirpath, self.k, self.spec.data.selection_metric)
        else:
            self.checkpoints = [ModelCheckpoint(**kwargs) for kwargs in checkpoint_settings(dirpath, self.spec.data.selection_metric)]
        self.dashboards = dashboard_callbacks(self.spec, self.recorder, self.loggers)
        log_batch_sizes(self.spec, self.loggers)

    def share(self, module: ClassificationModule) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """What the member's checkpoint files hold of the job's checkpoint: all of a single run's (with
        its config hash), member ``k``'s single-run checkpoint of a stack's."""
        if self.stacked:
            return lambda checkpoint: split_member_checkpoint(checkpoint, module, self.k, self.stateful_callbacks, self.spec.config_hash)
        return lambda checkpoint: {**checkpoint, CHECKPOINT_HASH_KEY: self.spec.config_hash}

    def epoch_done(self, history: list[dict[str, Any]]) -> None:
        """Write the running results.json and the epoch's metrics (single-run names) to the member's loggers."""
        self.record.write("running", history)
        row = history[-1]
        metrics = {name: row[key] for key, name in LOGGED_METRICS.items() if row.get(key) is not None}
        for logger in self.loggers:
            logger.log_metrics({**metrics, "epoch": row["epoch"] - 1}, step=row["epoch"] * self.steps_per_epoch - 1)
            logger.save()


# History column -> the metric name a run logs it under.
LOGGED_METRICS = {"train_loss": "train/loss", "train_acc1": "train/acc1", "lr": "lr", "val_loss": "val/loss", "val_acc1": "val/acc1",
                  "val_acc5": "val/acc5", "test_loss": "test/loss", "test_acc1": "test/acc1", "test_acc5": "test/acc5",
                  "lam": "mbn/lam", "tau": "mbn/tau"}


class _StepsPerEpoch(Callback):
    """Tells the members how many steps an epoch has (for their loggers' step numbers)."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = members

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for member in self.members:
            member.steps_per_epoch = int(trainer.num_training_batches)


def train(spec: RunSpec, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one run and record it in ``spec.output_dir/results.json``: :func:`train_stack` of one.

    Args:
        spec: the run.
        callbacks: extra Lightning callbacks.

    Returns:
        The final results (as written to ``results.json``).
    """
    (results,) = train_stack([spec], callbacks)
    return results


def train_stack(specs: Sequence[RunSpec], callbacks: Sequence[Callback] = (),
                conv_paths: str | Mapping[str, str] = "grouped") -> list[dict[str, Any]]:
    """Train K >= 1 runs as one job and record each in its dir; K > 1 runs (differing only in their
    seed, lr and weight decay) train as one stacked model, each member recorded exactly as its single run.

    ``results.json`` says ``running`` from the start (updated after every epoch) and ends as
    ``completed``, ``diverged`` (NaN/inf loss), ``failed`` (any exception; error and traceback
    recorded) or ``interrupted`` (Ctrl-C / SIGTERM). Each call appends one entry to ``attempts``
    (start, end, status, resumed checkpoint, host, pid, threads, GPUs), kept across resumes. Each
    member's dir ends with ``checkpoints/last.ckpt`` and ``best.ckpt`` (by its own val/acc1, or test/acc1 without a validation split) in the
    single-run format, ``csv/version_<n>/metrics.csv`` (one row per epoch), TensorBoard events with
    HParams and its own W&B run when configured (always finished). If every member has a
    ``last.ckpt`` the job resumes from them (loaded weights-only; a stack's must be of their
    configs, at the same epoch) and ends exactly as an uninterrupted one would; a member of a stack
    can also be resumed alone. A member of a stack whose loss turns NaN/inf is frozen and ends
    ``diverged``; the others train on. Under DDP (single runs) only rank 0 writes. This neither
    locks nor plans the dirs (:func:`~mbn.train.job.run_job` does): leave final members out.

    Args:
        specs: the members' runs (see :func:`check_stackable`).
        callbacks: extra Lightning callbacks of the job's Trainer.
        conv_paths: how a stack's convolutions compute (:func:`mbn.models.set_conv_paths`; the same numbers either way).

    Returns:
        Each member's final results (as written to its ``results.json``), in ``specs`` order.

    Raises:
        ValueError: runs that cannot be stacked, or that cannot resume together (some with a
            checkpoint and some without, checkpoints of another config or at different epochs).
    """
    specs = list(specs)
    check_stackable(specs)
    first, stacked = specs[0], len(specs) > 1
    # Checked before any record is written: a refused stack leaves every member's dir as it was.
    resumed = _resumed_checkpoints(specs) if stacked else None
    for spec in specs:
        Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    if first.trainer.num_threads:
        torch.set_num_threads(first.trainer.num_threads)
    schedule = MomentumScheduleCallback()
    members = [Member(k, spec, schedule, stacked) for k, spec in enumerate(specs)]
    for member in members:
        member.record.write("running")
    trainer: pl.Trainer | None = None
    status: str = "failed"
    error: tuple[str, str | None] | None = None
    module: ClassificationModule | None = None
    with signal_handling() as in_fit, tempfile.TemporaryDirectory(prefix="mbn-stack-") as scratch:
        try:
            datamodule = build_datamodule(specs)
            module = build_module(specs, datamodule, conv_paths)
            for member in members:
                member.attach(module)
            ckpt_path = _merged_checkpoint(members, resumed, module, Path(scratch)) if resumed else members[0].resume_from
            if ckpt_path is not None and not stacked:
                log.info("resuming %s from %s", first.run_name, ckpt_path)
            checkpoint_io = MemberCheckpointIO({Path(m.spec.output_dir) / CHECKPOINT_DIR: m.share(module) for m in members})
            trainer = build_trainer(first, [
                schedule, _StepsPerEpoch(members), NormLayerGuard(module.model), PerDeviceMomentumStats(first.trainer.mbn_history),
                *callbacks, *(callback for member in members for callback in member.callbacks),
            ], checkpoint_io)
            fit(trainer, module, datamodule, ckpt_path, in_fit)
            status = "completed"
        except RECORDED_EXCEPTIONS as exc:
            status, error = failure_status(exc, trainer)
            if is_disk_full(exc):
                error = (disk_full_message(error[0], Path(first.output_dir)), error[1])
        finally:
            diverged = getattr(module, "diverged", {})
            results = []
            for member in members:
                # A stack member's divergence is its own end; any other end (completed, failed, ...) is the job's.
                own_status, own_error = ("diverged", (diverged[member.k], None)) if member.k in diverged else (status, error)
                # The recorder's history includes the rows restored from a resumed checkpoint.
                history = member.recorder.history or None
                results.append(member.record.write(own_status, history, error=own_error, finished=True))
                finish_loggers(member.loggers, exit_code=0 if own_status == "completed" else 1)
    return results


def build_datamodule(specs: Sequence[RunSpec]) -> ImageDataModule | StackedDataModule:
    """The job's data: a single run's, or each member's batches side by side for a stack."""
    first = specs[0]
    if len(specs) == 1:
        return ImageDataModule(first.data, seed=first.seed, cache_dir=first.cache_dir)
    return StackedDataModule(first.data, [spec.seed for spec in specs], cache_dir=first.cache_dir)


def build_module(specs: Sequence[RunSpec], datamodule: ImageDataModule | StackedDataModule,
                 conv_paths: str | Mapping[str, str] = "grouped") -> ClassificationModule:
    """Each member's model as its single run builds it (seeded), stacked when there are several, in the job's module.

    Args:
        specs: the members' runs.
        datamodule: the job's data.
        conv_paths: a stack's convolution paths (:func:`mbn.models.set_conv_paths`).
    """
    steps_per_epoch = datamodule.steps_per_epoch(specs[0].trainer.world_size)
    models = [build_seeded_model(spec, datamodule.num_classes, datamodule.in_channels, steps_per_epoch) for spec in specs]
    if len(models) == 1:
        return training_module(specs[0], models[0], datamodule.num_classes)
    stacked = stack(models)
    set_conv_paths(stacked, conv_paths)  # before compiling (training_module): the path is part of the traced forward
    module = training_module(specs[0], stacked, datamodule.num_classes, StackedClassificationModule)
    if any(spec.optim != specs[0].optim for spec in specs):
        module.member_optims = [spec.optim for spec in specs]
    return module


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


def _merged_checkpoint(members: Sequence[Member], checkpoints: Sequence[dict[str, Any]], module: ClassificationModule,
                       scratch: Path) -> Path:
    """Write the stack's checkpoint merged from the members' ``last.ckpt`` to ``scratch``; its path."""
    merged = merge_member_checkpoints(checkpoints, module, [member.stateful_callbacks for member in members])
    path = scratch / "stack.ckpt"
    AtomicCheckpointIO().save_checkpoint(merged, path)
    for member in members:
        log.info("resuming %s from %s (in a stack of %d)", member.spec.run_name, member.resume_from, len(members))
    return path

def library_versions() -> dict[str, str]:
    """The library versions a run's ``results.json`` records."""
    return {"mbn": mbn.__version__, "torch": torch.__version__, "pytorch_lightning": pl.__version__}


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule, ckpt_path: str | Path | None,
        in_fit: threading.Event) -> None:
    """``trainer.fit`` (checkpoint loaded weights-only), marked as inside fit for :func:`signal_handling`.

    Args:
        trainer: the run's trainer.
        module: what it trains.
        datamodule: its data.
        ckpt_path: the checkpoint to resume from, or None.
        in_fit: the event :func:`signal_handling` yields.
    """
    in_fit.set()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        in_fit.clear()


def log_batch_sizes(spec: RunSpec, loggers: list) -> None:
    """Record the per-device (normalization) and global batch sizes and the scaled lr."""
    sizes = {
        "batch_size_per_device": spec.data.batch_size,
        "world_size": spec.trainer.world_size,
        "global_batch_size": spec.global_batch_size,
        "lr": spec.optim.lr(spec.global_batch_size),
    }
    if rank_zero_only.rank == 0:
        log.info(
            "%s: batch %d per device x %d device(s) = global batch %d, lr %.4g",
            spec.run_name, sizes["batch_size_per_device"], sizes["world_size"], sizes["global_batch_size"], sizes["lr"],
        )
    for logger in loggers:
        logger.log_hyperparams(sizes)


# What ends a run with a recorded status (failure_status) rather than escaping train().
RECORDED_EXCEPTIONS = (Exception, KeyboardInterrupt, SIGTERMException, RunInterrupted, SystemExit)


def failure_status(exc: BaseException, trainer: pl.Trainer | None) -> tuple[str, tuple[str, str | None]]:
    """The ``results.json`` status and ``(error, traceback)`` of a run that ``exc`` ended.

    Args:
        exc: one of :data:`RECORDED_EXCEPTIONS`.
        trainer: the run's trainer, if built (tells Lightning's Ctrl-C exit from other exits).
    """
    if isinstance(exc, DivergedError):
        return "diverged", _error(exc)
    if isinstance(exc, (KeyboardInterrupt, SIGTERMException, RunInterrupted)):
        return "interrupted", _error(exc, with_traceback=False)
    if isinstance(exc, SystemExit) and trainer is not None and trainer.interrupted:
        # Lightning turns Ctrl-C during fit into sys.exit(1) after a graceful shutdown.
        return "interrupted", ("KeyboardInterrupt", None)
    # Every other failure must end up in results.json.
    return "failed", _error(exc)


def _error(exc: BaseException, with_traceback: bool = True) -> tuple[str, str | None]:
    message = f"{type(exc).__name__}: {exc}".rstrip(": ")
    text = "".join(traceback.format_exception(exc)) if with_traceback else None
    return message, text


@contextmanager
def signal_handling() -> Iterator[threading.Event]:
    """Turn SIGTERM into :class:`RunInterrupted` while not inside ``trainer.fit``; restore SIGINT after.

    Inside fit, Lightning's own handler (which chains to this one) stops the loop at the next batch
    and raises ``SIGTERMException``; this handler then does nothing so that shutdown stays graceful.
    Lightning ignores SIGINT after a Ctrl-C; the previous SIGINT handler is put back on exit.
    Yields the event that marks "inside fit".
    """
    in_fit = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield in_fit
        return

    def handler(signum: int, frame: Any) -> None:
        if not in_fit.is_set():
            raise RunInterrupted(f"signal {signal.Signals(signum).name}")

    previous_sigint = signal.getsignal(signal.SIGINT)
    previous_sigterm = signal.signal(signal.SIGTERM, handler)
    try:
        yield in_fit
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        signal.signal(signal.SIGINT, previous_sigint)
