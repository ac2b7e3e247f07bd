"""What ``mbn-train`` prints about a job, and the bookkeeping it removes after one that never ran."""

from __future__ import annotations

import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from mbn.results import LOCK_FILENAME, read_results
from mbn.train.job import JobOutcome
from mbn.utils.io import DiskFullError
from mbn.utils.library_internals import hydra_job_dir_in_traceback


def print_outcome(outcome: JobOutcome) -> None:
    """The job's one line: ``mbn-train: completed <dir>: final test acc1 ..., 12.3 s`` (or why it was skipped)."""
    if outcome.status in ("skipped", "busy"):
        print(f"mbn-train: skipped {outcome.output_dir} ({outcome.error})", flush=True)
        return
    try:
        results = read_results(outcome.output_dir)
    except (OSError, ValueError):
        results = {}
    metrics = results.get("metrics") or {}
    summary = f"mbn-train: {outcome.status} {outcome.output_dir}"
    if metrics.get("final_val_acc1") is not None:
        summary += f": final val acc1 {metrics['final_val_acc1']:.4f}, best {metrics['best_val_acc1']:.4f} (epoch {metrics['best_epoch']})"
    if metrics.get("final_test_acc1") is not None:
        summary += f"{',' if metrics.get('final_val_acc1') is not None else ':'} final test acc1 {metrics['final_test_acc1']:.4f}"
    summary += f", {results.get('wall_time_s', 0):.1f} s"
    if outcome.error:
        summary += f" - {outcome.error}"
    print(summary, flush=True)


def remove_if_only_bookkeeping(output_dir: Path) -> None:
    """Remove ``output_dir`` when it holds only Hydra's files (``.hydra/``, ``<job>.log``) and the lock.

    Hydra creates the job dir before the config is checked; an invalid config, a dry run or a run
    found in another dir should not leave an empty run dir behind.
    """
    entries = list(output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and all(p.name in (".hydra", LOCK_FILENAME) or (p.suffix == ".log" and p.is_file()) for p in entries):
        shutil.rmtree(output_dir, ignore_errors=True)


def hydra_output_dir(exc: BaseException) -> str | None:
    """The job's (or sweep's) dir Hydra was writing to when ``exc`` was raised, for a message; None if unknown.

    Hydra resets its config when a job fails, so the job's dir is read from its ``run_job`` frame.
    """
    try:
        job_dir = hydra_job_dir_in_traceback(exc)
        if job_dir is not None:
            return job_dir
        hydra_cfg = HydraConfig.instance().cfg.hydra
        return str(OmegaConf.select(hydra_cfg, "sweep.dir" if hydra_cfg.mode == RunMode.MULTIRUN else "run.dir"))
    except Exception:  # noqa: BLE001 - only a message's detail
        return None


def disk_full_line(exc: OSError) -> str:
    """``mbn-train``'s one line for a full disk before a job could record anything (Hydra's own files)."""
    if isinstance(exc, DiskFullError):
        return f"mbn-train: {exc}"
    return f"mbn-train: the disk is full (no space left on device) writing in {hydra_output_dir(exc) or 'the output dir'}"
