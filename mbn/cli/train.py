"""``mbn-train [overrides]``: one training run, or a sweep with ``-m`` (Hydra multirun).

Examples::

    mbn-train norm=mbn data.batch_size=2 epochs=30
    mbn-train -m norm=bn,gn,brn,mbn data.batch_size=2,4,8,16,32 seed=0,1,2
    mbn-train -m experiment=demo dry_run=true               # list what would run, skip, resume
    mbn-train -m experiment=demo hydra/launcher=joblib hydra.launcher.n_jobs=2
    mbn-train -m experiment=paper_cifar10 hydra/launcher=slurm hydra.launcher.partition=gpu
    mbn-train trainer=ddp trainer.devices=4 data.batch_size=8     # m=8 per GPU, global batch 32

A thin Hydra adapter: it checks the composed config (:mod:`mbn.cli.schema`) and hands the job to
:func:`mbn.train.job.run_job`, which owns the job's life (plan, lock, dir, run, record). Each job
runs in a deterministic dir (``<output_root>/runs/<overrides>`` or
``<output_root>/sweeps/<sweep_name>/<overrides>``). A failing job never stops a sweep; before the
first job starts every job's config is checked (see :mod:`mbn.cli.sweep`). DDP jobs
(``trainer.devices > 1``) run as that many processes started with torchrun, also inside a sweep.
Exit code: 0 when every job completed (or was skipped as completed, or is running in another
command), 1 if one failed, 2 for an invalid config or an unwritable output dir, 3 if one
diverged, 130 when interrupted.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbn.cli import sweep
from mbn.cli.config import CONFIG_DIR, ConfigError, check_buildable, composition_error
from mbn.cli.launch import DDP_CHILD_ENV, RELAUNCHED_STRATEGIES, external_rank, pin_parallel_job, quiet_lightning, train_ddp_processes
from mbn.cli.schema import load_job, to_run_spec
from mbn.results import LOCK_FILENAME, config_hash
from mbn.train.job import JobOutcome, plan_job, run_job, run_pack, same_config_dirs
from mbn.train.run_dir import INVOCATION_ENV, verify_checkpoint
from mbn.utils.io import DiskFullError, is_disk_full
from mbn.utils.library_internals import hydra_job_dir_in_traceback

log = logging.getLogger("mbn.cli")

EXIT_CODES = sweep.EXIT_CODES

__all__ = ["main", "EXIT_CODES"]


def run_task(cfg: DictConfig) -> JobOutcome | None:
    """Check one composed job, then run it (or, with ``dry_run=true``, say what it would do).

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
    callbacks = []
    if job.fail_at_epoch is not None:
        from mbn.train.callbacks import FailAtEpoch

        callbacks.append(FailAtEpoch(job.fail_at_epoch))
    if job.hold_at_epoch is not None:
        from mbn.train.callbacks import HoldAtEpoch

        callbacks.append(HoldAtEpoch(job.hold_at_epoch))

    def train_here(run: Any) -> dict:
        from mbn.train.run import train  # Lightning import: only once the job is known to train

        quiet_lightning()
        return train(run, callbacks=callbacks)

    if os.environ.get(DDP_CHILD_ENV):
        # One of the DDP processes this job's own mbn-train started: the parent planned and locked
        # the dir, and reports the outcome.
        return JobOutcome(train_here(spec)["status"], output_dir)
    rank = external_rank()
    if rank is not None and rank > 0:
        # Started by a cluster launcher (SLURM tasks, torchrun): rank 0 decides; the others follow it.
        return run_job(spec, rerun_diverged=job.rerun_diverged, trainer=train_here, locked=False)
    pin_parallel_job(spec, hydra_cfg)
    relaunch = rank is None and spec.trainer.world_size > 1 and spec.trainer.strategy in RELAUNCHED_STRATEGIES
    if relaunch and spec.trainer.num_nodes > 1:
        raise ConfigError("trainer.num_nodes", f"{spec.trainer.num_nodes} nodes need a cluster launcher "
                          "(hydra/launcher=slurm) that starts one process per device")
    seeds = job.train.pack_seeds()
    if len(seeds) > 1:
        quiet_lightning()
        members = [sweep.member_spec(job, spec, seed) for seed in seeds]
        outcomes = run_pack(members, rerun_diverged=job.rerun_diverged, callbacks=callbacks)
        for outcome in outcomes:
            _print_outcome(outcome)
        # The sweep counts every member from its dir; this job reports its worst member.
        return max(outcomes, key=lambda outcome: EXIT_CODES.get(outcome.status, 1))
    trainer = (lambda run: train_ddp_processes(run, overrides)) if relaunch else train_here
    outcome = run_job(spec, rerun_diverged=job.rerun_diverged, trainer=trainer)
    _print_outcome(outcome)
    if Path(outcome.output_dir) != output_dir:  # the config's run is in another dir: leave no empty one
        _remove_if_only_bookkeeping(output_dir)
    return outcome


def _print_outcome(outcome: JobOutcome) -> None:
    """The job's one line: ``mbn-train: completed <dir>: final test acc1 ..., 12.3 s`` (or why it was skipped)."""
    from mbn.results import read_results

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


def _remove_if_only_bookkeeping(output_dir: Path) -> None:
    # Hydra creates the job dir (.hydra/, <job>.log) before the config is checked; an invalid
    # config should not leave an empty run dir behind.
    entries = list(output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and all(p.name in (".hydra", LOCK_FILENAME) or (p.suffix == ".log" and p.is_file()) for p in entries):
        shutil.rmtree(output_dir, ignore_errors=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        outcome = run_task(cfg)
    except ConfigError as exc:
        print(f"mbn-train: invalid config: {exc}", file=sys.stderr, flush=True)
        _remove_if_only_bookkeeping(Path(hydra_cfg.runtime.output_dir))
        if multirun:  # (the sweep checks every job's config first; this is a last line of defense)
            return
        raise SystemExit(EXIT_CODES["config_error"]) from None
    if multirun:
        if outcome is not None and outcome.status == "interrupted" and "BasicLauncher" in str(hydra_cfg.launcher.get("_target_", "")):
            # Stop the whole sweep: the user (or the scheduler) asked to stop. (Jobs of other launchers
            # run in other processes; their launcher stops on its own, and the sweep summary reports it.)
            raise SystemExit(EXIT_CODES["interrupted"])
        return
    if outcome is None:
        _remove_if_only_bookkeeping(Path(hydra_cfg.runtime.output_dir))
        return
    # A single run's exit code; a sweep's is set by its summary (mbn.cli.sweep.SweepCallback).
    raise SystemExit(EXIT_CODES.get(outcome.status, 1))


def _hydra_output_dir(exc: BaseException) -> str | None:
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


def main() -> int:
    """Console entry point (``mbn-train``); the arguments are ``sys.argv`` (``hydra.main`` reads
    them itself and takes no argument list: facebookresearch/hydra#2064).

    Composition errors (an unknown group option or key, a wrong type) are reported in one line
    naming the key, with exit code 2, as every other config error: ``HYDRA_FULL_ERROR`` makes
    Hydra raise them to this function instead of printing its own report.

    Returns:
        The exit code: 0 when every job completed (or was skipped, or runs in another command),
        1 if one failed, 2 for an invalid config (of any job of a sweep: checked before the first
        starts) or an unwritable output dir, 3 if one diverged, 130 when interrupted.
    """
    if not os.environ.get(DDP_CHILD_ENV):
        os.environ[INVOCATION_ENV] = uuid.uuid4().hex[:12]
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
        where = _hydra_output_dir(exc)
        print(f"mbn-train: {exc}" if isinstance(exc, DiskFullError) else
              f"mbn-train: the disk is full (no space left on device) writing in {where or 'the output dir'}",
              file=sys.stderr, flush=True)
        return EXIT_CODES["failed"]
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return 0


if __name__ == "__main__":
    # `python -m mbn.cli.train` (how DDP jobs and the experiment runners start it) is the console
    # script: the same dependency check and override quoting (mbn.cli.entry_points).
    from mbn.cli.entry_points import train as console_script

    sys.exit(console_script())
