"""One training run end to end: build, fit (resuming from ``last.ckpt``), and record ``results.json``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

import mbn
from mbn.models import build_model
from mbn.nn import norm_layer
from mbn.train.callbacks import ConfigHashStamp, EpochRecorder, MomentumScheduleCallback, NormLayerGuard
from mbn.train.checkpoint_io import AtomicCheckpointIO
from mbn.train.ddp_buffers import PerDeviceMomentumStats
from mbn.train.datamodule import ImageDataModule
from mbn.train.run_dir import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, JobRecord, disk_full_message, last_checkpoint
from mbn.train.loggers import build_loggers, dashboard_callbacks, finish_loggers
from mbn.train.module import ClassificationModule, DivergedError
from mbn.train.spec import RunSpec
from mbn.utils.io import is_disk_full

log = logging.getLogger("mbn.train")


class RunInterrupted(BaseException):
    """SIGTERM outside ``trainer.fit`` (inside it Lightning raises its own ``SIGTERMException``)."""


def build_seeded_model(spec: RunSpec, num_classes: int, in_channels: int) -> torch.nn.Module:
    """The run's network, initialized from ``spec.seed`` (seeds every generator first).

    A stacked run builds each member with this, so member k starts exactly as its single run.

    Args:
        spec: the run.
        num_classes: classes of the dataset.
        in_channels: image channels of the dataset.
    """
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    return build_model(
        spec.model.name,
        num_classes=num_classes,
        norm_layer=norm_layer(spec.norm.name, **spec.norm_options),
        width=spec.model.width,
        in_channels=in_channels,
        **spec.model.options,
    )


def build_module(spec: RunSpec, datamodule: ImageDataModule) -> ClassificationModule:
    """Seeded model + LightningModule for ``spec`` (loads the data to learn classes and channels).

    Args:
        spec: the run.
        datamodule: provides ``num_classes`` and ``in_channels``.
    """
    model = build_seeded_model(spec, datamodule.num_classes, datamodule.in_channels)
    return training_module(spec, model, datamodule.num_classes)


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
    )


def show_progress_bar(spec: RunSpec) -> bool:
    """Lightning's progress bar when configured so, else only on an interactive terminal."""
    if spec.trainer.progress_bar is not None:
        return spec.trainer.progress_bar
    return sys.stdout.isatty()


def checkpoint_callbacks(output_dir: str | Path, cls: type[ModelCheckpoint] = ModelCheckpoint, **kwargs: Any) -> list[ModelCheckpoint]:
    """A run's checkpoint callbacks: ``last.ckpt`` after every epoch, then ``best.ckpt`` by val/acc1.

    Args:
        output_dir: the run's dir.
        cls: the callback class (a stacked run's members use a subclass that saves their share).
        **kwargs: more arguments of ``cls``.
    """
    # last.ckpt after every epoch (what a rerun resumes from; Lightning's save_last=True only
    # rewrites it in epochs that also save a top-k checkpoint), best.ckpt by val/acc1.
    dirpath = Path(output_dir) / CHECKPOINT_DIR
    last = cls(dirpath=dirpath, filename=Path(LAST_CHECKPOINT).stem, monitor=None, save_top_k=1,
               enable_version_counter=False, **kwargs)
    best = cls(dirpath=dirpath, filename=Path(BEST_CHECKPOINT).stem, monitor="val/acc1", mode="max", save_top_k=1,
               enable_version_counter=False, **kwargs)
    return [last, best]


def trainer_options(spec: RunSpec) -> dict[str, Any]:
    """The ``pl.Trainer`` arguments a run's settings decide (all but callbacks and loggers).

    Args:
        spec: the run (for a stacked run: any member, they share these settings).
    """
    progress_bar = show_progress_bar(spec)
    # Checkpoints are written temp + rename and loaded weights-only.
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Time limits are handled by the launcher (submitit requeues the job, which resumes from
        # last.ckpt); Lightning's own SIGUSR1 requeue would race it.
        plugins.append(SLURMEnvironment(auto_requeue=False))
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
        plugins=plugins,
        enable_progress_bar=progress_bar,
        enable_model_summary=progress_bar,
        num_sanity_val_steps=0,
        # Metrics are logged once per epoch; keep Lightning from flushing per-step rows.
        log_every_n_steps=1_000_000,
        default_root_dir=spec.output_dir,
    )


def build_trainer(spec: RunSpec, callbacks: Sequence[Callback], loggers: list) -> pl.Trainer:
    """The Lightning Trainer of a run: epoch-level logging only, checkpoints last (every epoch) + best.

    Args:
        spec: the run.
        callbacks: extra callbacks (the checkpoint callbacks are added here).
        loggers: metric loggers.
    """
    return pl.Trainer(
        logger=loggers,
        callbacks=[*callbacks, ConfigHashStamp(spec.config_hash), PerDeviceMomentumStats(spec.trainer.mbn_history),
                   *checkpoint_callbacks(spec.output_dir)],
        **trainer_options(spec),
    )


def train(spec: RunSpec, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one run and record it in ``spec.output_dir/results.json``.

    ``results.json`` says ``running`` from the start (updated after every epoch) and ends as
    ``completed``, ``diverged`` (NaN/inf loss), ``failed`` (any exception; error and traceback
    recorded) or ``interrupted`` (Ctrl-C / SIGTERM). If ``checkpoints/last.ckpt`` exists the run
    resumes from it (loaded weights-only) and ends exactly as an uninterrupted run would. Each call
    appends one entry to ``attempts`` (start, end, status, resumed checkpoint, host, pid, threads,
    GPUs), kept across resumes. W&B runs are always finished. Under DDP only rank 0 writes.

    Args:
        spec: the run.
        callbacks: extra Lightning callbacks.

    Returns:
        The final results (as written to ``results.json``).
    """
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = last_checkpoint(output_dir)
    if spec.trainer.num_threads:
        torch.set_num_threads(spec.trainer.num_threads)
    record = JobRecord(spec, resume_from, rank=rank_zero_only.rank, versions=library_versions())
    record.write("running")
    loggers: list = []
    trainer: pl.Trainer | None = None
    recorder: EpochRecorder | None = None
    status: str = "failed"
    error: tuple[str, str | None] | None = None
    with signal_handling() as in_fit:
        try:
            datamodule = ImageDataModule(spec.data, seed=spec.seed, cache_dir=spec.cache_dir)
            module = build_module(spec, datamodule)
            loggers = build_loggers(spec)
            schedule = MomentumScheduleCallback()
            recorder = EpochRecorder(
                schedule,
                on_epoch=lambda history: record.write("running", history),
                log_lines=not show_progress_bar(spec),
                total_epochs=spec.epochs,
            )
            trainer = build_trainer(spec, [schedule, recorder, NormLayerGuard(module.model), *dashboard_callbacks(spec, recorder),
                                           *callbacks], loggers)
            log_batch_sizes(spec, loggers)
            if resume_from is not None:
                log.info("resuming %s from %s", spec.run_name, resume_from)
            fit(trainer, module, datamodule, resume_from, in_fit)
            status = "completed"
        except RECORDED_EXCEPTIONS as exc:
            status, error = failure_status(exc, trainer)
            if is_disk_full(exc):
                error = (disk_full_message(error[0], output_dir), error[1])
        finally:
            # The recorder's history includes the rows restored from a resumed checkpoint.
            history = recorder.history if recorder is not None and recorder.history else None
            results = record.write(status, history, error=error, finished=True)
            finish_loggers(loggers, exit_code=0 if status == "completed" else 1)
    return results


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
