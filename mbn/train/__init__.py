"""Lightning training of one run (no Hydra here: ``mbn.cli`` turns configs into a :class:`RunSpec`).

Names are imported on first use, so ``from mbn.train.spec import RunSpec`` (plain dataclasses)
does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AtomicCheckpointIO": "mbn.train.checkpoint_io",
    "ClassificationModule": "mbn.train.module",
    "DivergedError": "mbn.train.module",
    "EpochRecorder": "mbn.train.callbacks",
    "FailAtEpoch": "mbn.train.callbacks",
    "JobResources": "mbn.train.resources",
    "NormLayerGuard": "mbn.train.callbacks",
    "job_resources": "mbn.train.resources",
    "MomentumScheduleCallback": "mbn.train.callbacks",
    "ImageDataModule": "mbn.train.datamodule",
    "build_optimizer": "mbn.train.optim",
    "lr_factor": "mbn.train.optim",
    "build_loggers": "mbn.train.loggers",
    "last_checkpoint": "mbn.train.run_dir",
    "run_job": "mbn.train.job",
    "plan_job": "mbn.train.job",
    "JobRecord": "mbn.train.run_dir",
    "train": "mbn.train.run",
    "train_stack": "mbn.train.run",
    "DataSpec": "mbn.train.spec",
    "LoggerSpec": "mbn.train.spec",
    "ModelSpec": "mbn.train.spec",
    "NormSpec": "mbn.train.spec",
    "OptimSpec": "mbn.train.spec",
    "RunSpec": "mbn.train.spec",
    "TrainerSpec": "mbn.train.spec",
    "WandbSpec": "mbn.train.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mbn.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
