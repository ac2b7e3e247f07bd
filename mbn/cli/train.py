"""``mbn-train [overrides]``: one training run, or a sweep with ``-m`` (Hydra multirun).

Examples::

    mbn-train norm=mbn data.batch_size=2 epochs=30
    mbn-train -m norm=bn,gn,brn,mbn data.batch_size=2,4,8,16,32 seed=0,1,2
    mbn-train -m experiment=demo dry_run=true               # list what would run, skip, resume
    mbn-train -m experiment=paper_cifar10 hydra/launcher=slurm hydra.launcher.partition=gpu
    mbn-train trainer=ddp trainer.devices=4 data.batch_size=8     # m=8 per GPU, global batch 32

The task reads top to bottom: Hydra composes, :mod:`mbn.cli.schema` checks, the job is planned
(dry run) or launched (:mod:`mbn.cli.launch`: in this process, as DDP processes, as a stacked pack;
:mod:`mbn.train.job` owns its life: plan, lock, dir, run, record), and its outcome is reported
(:mod:`mbn.cli.report`; a sweep's summary and sweeper values: :mod:`mbn.cli.sweep`). Each job runs in
a deterministic dir (``<output_root>/runs/<overrides>`` or ``<output_root>/sweeps/<sweep>/<overrides>``).
Exit codes: see :func:`main`.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mbn.cli import sweep
from mbn.cli.config import CONFIG_DIR, ConfigError, check_buildable, composition_error
from mbn.cli.launch import DDP_CHILD_ENV, external_rank, launch_job
from mbn.cli.report import disk_full_line, remove_if_only_bookkeeping
from mbn.cli.schema import load_job, to_run_spec
from mbn.results import config_hash
from mbn.train.job import JobOutcome, plan_job, same_config_dirs
from mbn.train.run_dir import INVOCATION_ENV, verify_checkpoint
from mbn.utils.io import is_disk_full

log = logging.getLogger("mbn.cli")

EXIT_CODES = sweep.EXIT_CODES

__all__ = ["main", "EXIT_CODES"]


def run_task(cfg: DictConfig) -> JobOutcome | None:
    """Check one composed job, plan it, and run it (or, with ``dry_run=true``, say what it would do).

    Returns:
        The job's outcome; None for a dry run.

    Raises:
        ConfigError: invalid config (before any heavy import).
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    job = load_job(cfg)
    digest = config_hash(job.config)
    spec = to_run_spec(job, output_dir, overrides, digest)
    if job.dry_run:
        plan = verify_checkpoint(plan_job(output_dir, digest, job.rerun_diverged, search=same_config_dirs(spec)), output_dir, digest)
        print(plan.line(output_dir), flush=True)
        return None
    check_buildable(spec)
    outcome = launch_job(job, spec, overrides, hydra_cfg)
    if Path(outcome.output_dir) != output_dir:  # the config's run is in another dir: leave no empty one
        remove_if_only_bookkeeping(output_dir)
    return outcome


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Run one job; in a sweep, return its ``objective`` to the sweeper (None when it did not complete:
    :func:`mbn.cli.sweep.objective_value`), and record its outcome for the sweep's summary."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        outcome = run_task(cfg)
    except ConfigError as exc:
        print(f"mbn-train: invalid config: {exc}", file=sys.stderr, flush=True)
        remove_if_only_bookkeeping(Path(hydra_cfg.runtime.output_dir))
        if multirun:  # (the sweep checks every job's config first; this is a last line of defense)
            sweep.record_job(JobOutcome("config_error", Path(hydra_cfg.runtime.output_dir), str(exc)), None)
            return None
        raise SystemExit(EXIT_CODES["config_error"]) from None
    if multirun:
        return sweep.end_job(outcome, str(cfg.objective), deciding_rank=(external_rank() or 0) == 0)
    if outcome is None:
        remove_if_only_bookkeeping(Path(hydra_cfg.runtime.output_dir))
        return
    # A single run's exit code; a sweep's is set by its summary (mbn.cli.sweep.SweepCallback).
    raise SystemExit(EXIT_CODES.get(outcome.status, 1))


def main() -> int:
    """Console entry point (``mbn-train``); the arguments are ``sys.argv`` (``hydra.main`` reads
    them itself and takes no argument list: facebookresearch/hydra#2064).

    Composition errors (an unknown group option or key, a wrong type) are one line naming the key,
    exit code 2, as every config error (``HYDRA_FULL_ERROR`` makes Hydra raise them to this function).

    Returns:
        The exit code: 0 when every job completed (or was skipped, or runs in another command),
        1 if one failed, 2 for an invalid config (of any job of a sweep: checked before the first
        starts) or an unwritable output dir, 3 if one diverged, 130 when interrupted.
    """
    if not os.environ.get(DDP_CHILD_ENV):
        os.environ[INVOCATION_ENV] = uuid.uuid4().hex[:12]
        os.environ[sweep.SWEEP_PROCESS_ENV] = str(os.getpid())
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # A log file on a full disk must not print a traceback per message: the job's failure is reported.
    logging.raiseExceptions = False
    try:
        _hydra_main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (HydraException, OmegaConfBaseException) as exc:  # composition; a job records its own failures
        error = composition_error(exc)
        print(f"mbn-train: invalid config: {error}", file=sys.stderr, flush=True)
        return EXIT_CODES["config_error"]
    except OSError as exc:  # a full disk before a job could record anything (Hydra's own files)
        if not is_disk_full(exc):
            raise
        print(disk_full_line(exc), file=sys.stderr, flush=True)
        return EXIT_CODES["failed"]
    except Exception as exc:  # a sweeper that raised after its jobs ran (Optuna's when none completed)
        code = sweep.summarize_after_sweeper_error(exc)
        if code is None:
            raise
        return code
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return 0


if __name__ == "__main__":  # `python -m mbn.cli.train` (DDP jobs, experiment runners) is the console script
    from mbn.cli.entry_points import train as console_script

    sys.exit(console_script())
