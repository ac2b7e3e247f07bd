"""Metric loggers of a run: CSV always, W&B and TensorBoard on request."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from mbn.train.spec import RunSpec


def run_tags(spec: RunSpec) -> list[str]:
    """Tags that let a dashboard group runs by norm, batch size, model and dataset."""
    return [
        f"norm={spec.norm.name}",
        f"m={spec.data.batch_size}",
        f"model={spec.model.name}",
        f"data={spec.data.name}",
    ]


def build_loggers(spec: RunSpec) -> list[Logger]:
    """Create the run's loggers, all writing below ``spec.output_dir``.

    CSV and TensorBoard write one ``version_<n>`` dir per attempt, so resuming never overwrites the
    metrics of an earlier attempt. W&B starts one run per attempt (never shared between the jobs of
    a sweep); the caller must finish it (see :func:`finish_loggers`).

    Args:
        spec: the run.
    """
    loggers: list[Logger] = [CSVLogger(save_dir=spec.output_dir, name="csv")]
    if spec.loggers.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=spec.output_dir, name="tensorboard", default_hp_metric=False))
    wandb_spec = spec.loggers.wandb
    if wandb_spec is not None:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                name=spec.run_name,
                save_dir=str(spec.output_dir),
                project=wandb_spec.project,
                entity=wandb_spec.entity,
                offline=wandb_spec.offline,
                group=spec.sweep_name,
                job_type=wandb_spec.job_type,
                tags=run_tags(spec) + list(wandb_spec.tags),
                config=wandb_config(spec),
            )
        )
    return loggers


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


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Close loggers; a W&B run is finished with ``exit_code`` (non-zero marks it failed).

    Lightning only finalizes W&B loggers without finishing the run; an unfinished run would be
    reused by the next job of a multirun sweep in the same process.
    """
    for logger in loggers:
        try:
            logger.finalize("success" if exit_code == 0 else "failed")
        finally:
            experiment = getattr(logger, "_experiment", None)
            if experiment is not None and hasattr(experiment, "finish"):
                experiment.finish(exit_code=exit_code)
