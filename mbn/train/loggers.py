"""Metric loggers of a run: CSV always, W&B and TensorBoard on request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from mbn.results import summarize_history
from mbn.train.spec import CsvLoggerSpec, RunSpec, TensorBoardSpec, WandbSpec
from mbn.utils.library_internals import started_wandb_run, write_tensorboard_summaries

if TYPE_CHECKING:
    from mbn.train.callbacks import EpochRecorder

# results.json's metrics shown next to the hyperparameters in TensorBoard's HParams dashboard, by tag.
# The val ones only when the run has a validation split (null metrics are left out).
DASHBOARD_METRICS = {
    "final/test_acc1": "final_test_acc1",
    "final/test_acc5": "final_test_acc5",
    "final/test_loss": "final_test_loss",
    "best_epoch/test_acc1": "best_epoch_test_acc1",
    "final/val_acc1": "final_val_acc1",
    "best/val_acc1": "best_val_acc1",
    "final/val_acc5": "final_val_acc5",
    "final/val_loss": "final_val_loss",
    "final/train_loss": "final_train_loss",
    "final/train_acc1": "final_train_acc1",
}


def run_tags(spec: RunSpec) -> list[str]:
    """Tags that let a dashboard group runs by norm, batch size, model and dataset."""
    return [
        f"norm={spec.norm.name}",
        f"m={spec.data.batch_size}",
        f"model={spec.model.name}",
        f"data={spec.data.name}",
    ]


# The logger each ``logger`` option builds: its schema class (:data:`mbn.train.spec.LOGGER_SCHEMAS`)
# -> builder(options, run, concurrent). A new logger is its schema class there and one builder here.
LoggerBuilder = Callable[[Any, RunSpec, bool], Logger]
LOGGER_BUILDERS: dict[type, LoggerBuilder] = {}


def logger_builder(schema: type) -> Callable[[LoggerBuilder], LoggerBuilder]:
    """Function decorator: register ``builder(options, run, concurrent) -> Logger`` as what a ``schema``
    object in :attr:`LoggerSpec.selected <mbn.train.spec.LoggerSpec.selected>` builds.

    Args:
        schema: a class of :data:`mbn.train.spec.LOGGER_SCHEMAS`.

    Raises:
        ValueError: ``schema`` has a builder already.
    """

    def register(builder: LoggerBuilder) -> LoggerBuilder:
        if schema in LOGGER_BUILDERS:
            raise ValueError(f"{schema.__name__} already has a builder: {LOGGER_BUILDERS[schema].__name__}")
        LOGGER_BUILDERS[schema] = builder
        return builder

    return register


@logger_builder(CsvLoggerSpec)
def _csv_logger(options: CsvLoggerSpec, spec: RunSpec, concurrent: bool) -> Logger:
    """``metrics.csv`` under ``<run dir>/csv/version_<n>/``."""
    return CSVLogger(save_dir=spec.output_dir, name="csv")


@logger_builder(TensorBoardSpec)
def _tensorboard_logger(options: TensorBoardSpec, spec: RunSpec, concurrent: bool) -> Logger:
    """Event files under ``<run dir>/tensorboard/version_<n>/`` (HParams: :class:`TensorBoardHParams`)."""
    return TensorBoardLogger(save_dir=spec.output_dir, name="tensorboard", default_hp_metric=False)


@logger_builder(WandbSpec)
def _wandb_logger(options: WandbSpec, spec: RunSpec, concurrent: bool) -> Logger:
    """One W&B run in the sweep's group, tagged and configured for grouping runs on the dashboard."""
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(
        name=spec.run_name,
        save_dir=str(spec.output_dir),
        project=options.project,
        entity=options.entity,
        offline=options.offline,
        group=spec.sweep_name,
        job_type=options.job_type,
        tags=run_tags(spec) + list(options.tags),
        config=wandb_config(spec),
        **({"reinit": "create_new"} if concurrent else {}),
    )


def build_loggers(spec: RunSpec, concurrent: bool = False) -> list[Logger]:
    """Create the run's loggers (:meth:`LoggerSpec.active <mbn.train.spec.LoggerSpec.active>`: CSV
    first, always), all writing below ``spec.output_dir``.

    CSV and TensorBoard write one ``version_<n>`` dir per attempt, so resuming never overwrites the
    metrics of an earlier attempt. W&B starts one run per attempt (never shared between the jobs of
    a sweep); the caller must finish it (see :func:`finish_loggers`).

    Args:
        spec: the run.
        concurrent: other runs' loggers are open in this process at the same time (the members of a
            stack): each W&B run is then its own (``reinit="create_new"``), never the process's global one.
    """
    return [LOGGER_BUILDERS[type(options)](options, spec, concurrent) for options in spec.loggers.active().values()]


def wandb_config(spec: RunSpec) -> dict[str, Any]:
    """The W&B run config: the resolved config plus the derived keys dashboards group by."""
    return {
        **spec.config,
        "norm_name": spec.norm.name,
        "batch_size": spec.data.batch_size,
        "global_batch_size": spec.global_batch_size,
        "world_size": spec.trainer.world_size,
        "config_hash": spec.config_hash,
        "output_dir": str(spec.output_dir),
    }


def dashboard_hparams(spec: RunSpec) -> dict[str, Any]:
    """The hyperparameters a dashboard compares runs by: norm, per-device batch size, seed, and the
    model, data and schedule that tell one study from another."""
    return {
        "norm": spec.norm.name,
        "batch_size": spec.data.batch_size,
        "seed": spec.seed,
        "model": spec.model.name,
        "width": spec.model.width,
        "data": spec.data.name,
        "epochs": spec.epochs,
        "world_size": spec.trainer.world_size,
        "global_batch_size": spec.global_batch_size,
        "lr": spec.optim.lr(spec.global_batch_size),
        "sweep": spec.sweep_name,
    }


class TensorBoardHParams(Callback):
    """When a fit completes, write the run's hyperparameters with its final metrics into the TensorBoard
    logger's event file, so the HParams dashboard lists every run with its norm, batch size and seed
    next to its final and best accuracy.

    Each run writes its HParams session (``session_start_info``/``session_end_info``) and one scalar
    per final metric, but no per-run ``experiment`` summary: without one TensorBoard builds the
    experiment from all the runs it finds, and then shows first the hyperparameters that differ
    between them (norm, batch size, seed in a sweep), instead of the first five by name. The metrics
    are :func:`mbn.results.summarize_history` of the whole run (the epochs before a resume
    included): the numbers ``results.json`` records.

    Args:
        spec: the run.
        recorder: the run's epoch history.
        loggers: the run's loggers (its TensorBoard logger gets the HParams).
    """

    def __init__(self, spec: RunSpec, recorder: "EpochRecorder", loggers: Sequence[Logger]) -> None:
        self.hparams = dashboard_hparams(spec)
        self.recorder = recorder
        self.loggers = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        summary = summarize_history(self.recorder.history)["metrics"]
        metrics = {tag: float(summary[key]) for tag, key in DASHBOARD_METRICS.items() if summary.get(key) is not None}
        if not trainer.is_global_zero:
            return
        for logger in self.loggers:
            logger.log_hyperparams(self.hparams)  # into hparams.yaml (no summary: default_hp_metric=False)
            logger.log_metrics(metrics, step=trainer.global_step)
            # The session without the experiment summary: no public call writes that (see the adapter).
            _, session_start, session_end = hparams_summaries(self.hparams, metrics)
            write_tensorboard_summaries(logger.experiment, [session_start, session_end])


def dashboard_callbacks(spec: RunSpec, recorder: "EpochRecorder", loggers: Sequence[Logger]) -> list[Callback]:
    """The callbacks the run's dashboards need: :class:`TensorBoardHParams` with the TensorBoard logger."""
    return [TensorBoardHParams(spec, recorder, loggers)] if "tensorboard" in spec.loggers.selected else []


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Close loggers; a W&B run is finished with ``exit_code`` (non-zero marks it failed).

    Lightning only finalizes W&B loggers without finishing the run; an unfinished run would be
    reused by the next job of a multirun sweep in the same process. A W&B logger that never started
    a run is not made to start one here.
    """
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        try:
            logger.finalize("success" if exit_code == 0 else "failed")
        finally:
            run = started_wandb_run(logger) if isinstance(logger, WandbLogger) else None
            if run is not None and hasattr(run, "finish"):
                run.finish(exit_code=exit_code)
