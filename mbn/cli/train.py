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

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
import warnings
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
from mbn.cli.schema import Job, load_job, to_run_spec
from mbn.results import config_hash
from mbn.train.job import (
    INVOCATION_ENV,
    LOCK_FILENAME,
    JobOutcome,
    plan_job,
    record_failure,
    run_job,
    run_pack,
    same_config_dirs,
    verify_checkpoint,
)
from mbn.train.spec import RunSpec
from mbn.utils.io import DiskFullError, is_disk_full

log = logging.getLogger("mbn.cli")

EXIT_CODES = sweep.EXIT_CODES
# Set in the torchrun processes mbn-train starts for a DDP job: the parent already planned the dir.
DDP_CHILD_ENV = "MBN_DDP_CHILD"
# DDP strategies whose processes mbn-train launches itself (torchrun) instead of Lightning re-running argv.
RELAUNCHED_STRATEGIES = ("ddp", "auto")

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

        _quiet_lightning()
        return train(run, callbacks=callbacks)

    if os.environ.get(DDP_CHILD_ENV):
        # One of the DDP processes this job's own mbn-train started: the parent planned and locked
        # the dir, and reports the outcome.
        return JobOutcome(train_here(spec)["status"], output_dir)
    rank = _external_rank()
    if rank is not None and rank > 0:
        # Started by a cluster launcher (SLURM tasks, torchrun): rank 0 decides; the others follow it.
        return run_job(spec, rerun_diverged=job.rerun_diverged, trainer=train_here, locked=False)
    _pin_parallel_job(spec, hydra_cfg)
    relaunch = rank is None and spec.trainer.world_size > 1 and spec.trainer.strategy in RELAUNCHED_STRATEGIES
    if relaunch and spec.trainer.num_nodes > 1:
        raise ConfigError("trainer.num_nodes", f"{spec.trainer.num_nodes} nodes need a cluster launcher "
                          "(hydra/launcher=slurm) that starts one process per device")
    seeds = job.train.pack_seeds()
    if len(seeds) > 1:
        _quiet_lightning()
        members = [_member_spec(job, spec, seed) for seed in seeds]
        outcomes = run_pack(members, rerun_diverged=job.rerun_diverged, callbacks=callbacks)
        for outcome in outcomes:
            _print_outcome(outcome)
        # The sweep counts every member from its dir; this job reports its worst member.
        return max(outcomes, key=lambda outcome: EXIT_CODES.get(outcome.status, 1))
    trainer = (lambda run: _train_ddp_processes(run, overrides)) if relaunch else train_here
    outcome = run_job(spec, rerun_diverged=job.rerun_diverged, trainer=trainer)
    _print_outcome(outcome)
    if Path(outcome.output_dir) != output_dir:  # the config's run is in another dir: leave no empty one
        _remove_if_only_bookkeeping(output_dir)
    return outcome


def _member_spec(job: Job, leader: RunSpec, seed: int) -> RunSpec:
    """The run of one member of a stacked pack: the leader's run with another seed, in that seed's dir.

    The dir is the one the unstacked sweep gives the job with this seed: the config's own
    ``hydra.sweep.subdir`` rule applied to the member's overrides.
    """
    overrides = [o for o in leader.overrides if o.lstrip("+").partition("=")[0] not in ("seed", "stack_seeds")]
    overrides.append(f"seed={seed}")
    hydra_cfg = HydraConfig.get()
    subdir_rule = OmegaConf.to_container(hydra_cfg.sweep, resolve=False)["subdir"]
    subdir = OmegaConf.create({"hydra": {"overrides": {"task": overrides}, "sweep": {"subdir": subdir_rule}}}).hydra.sweep.subdir
    config = {**job.config, "seed": seed}
    output_dir = Path(leader.output_dir).parent / str(subdir)
    return dataclasses.replace(leader, seed=seed, output_dir=output_dir, run_name=output_dir.name, config=config,
                               config_hash=config_hash(config), overrides=overrides)


def _print_outcome(outcome: JobOutcome) -> None:
    """The job's one line: ``mbn-train: completed <dir>: final val acc1 ..., 12.3 s`` (or why it was skipped)."""
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
    summary += f", {results.get('wall_time_s', 0):.1f} s"
    if outcome.error:
        summary += f" - {outcome.error}"
    print(summary, flush=True)


def _external_rank() -> int | None:
    """This process's global rank when a cluster launcher started several (SLURM tasks, torchrun), else None."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return None


class _WorkerSlot:
    """A joblib worker keeps the slot (GPU, threads) of its first job: CUDA_VISIBLE_DEVICES only
    counts before CUDA starts in a process, and the worker serves its later jobs from the same process."""

    slot: int | None = None
    gpu_ids: list[int] = []


def _pin_parallel_job(spec: Any, hydra_cfg: Any) -> None:
    """Under the joblib launcher, give the job its GPU(s) and its share of the CPU threads."""
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True) if hydra_cfg.get("launcher") else {}
    if "joblib" not in str(launcher.get("_target_", "")):
        return
    from mbn.train.resources import cpu_cores, job_resources, visible_gpu_ids

    cores = cpu_cores()
    n_jobs = int(launcher.get("n_jobs") or -1)
    if n_jobs < 0:  # joblib: -1 = one job per core, -2 = all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    if _WorkerSlot.slot is None:
        _WorkerSlot.slot = int(hydra_cfg.job.num) % n_jobs
        gpu = spec.trainer.accelerator in ("gpu", "cuda", "auto")
        _WorkerSlot.gpu_ids = visible_gpu_ids() if gpu else []
    resources = job_resources(_WorkerSlot.slot, n_jobs, cores, _WorkerSlot.gpu_ids, spec.trainer.devices)
    if resources.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = resources.cuda_visible_devices
    if spec.trainer.num_threads is None:
        spec.trainer.num_threads = resources.num_threads


def _train_ddp_processes(spec: Any, overrides: list[str]) -> dict:
    """Run a DDP job as ``trainer.devices`` processes started with torchrun, wait, return the record.

    Lightning's own DDP launcher re-runs ``sys.argv``, which inside a Hydra multirun (or a joblib /
    submitit worker) is the whole sweep or not mbn-train at all. Instead each process runs exactly
    this job: its overrides, with ``hydra.run.dir`` set to the job's dir. Rank 0 writes results.json.
    """
    from mbn.results import read_results

    output_dir = Path(spec.output_dir).resolve()
    if '"' in str(output_dir):
        raise ConfigError("output_root", f"a DDP job's dir cannot contain '\"': {output_dir}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec.trainer.devices}",
        "-m", "mbn.cli.train", *overrides,
        f'hydra.run.dir="{output_dir}"', "hydra.output_subdir=null", "hydra/job_logging=stdout",
    ]
    env = {**os.environ, DDP_CHILD_ENV: "1"}
    if spec.trainer.num_threads:
        env["OMP_NUM_THREADS"] = str(spec.trainer.num_threads)
    print(f"mbn-train: {output_dir}: {spec.trainer.devices} DDP processes (torchrun)", flush=True)
    proc = subprocess.Popen(command, env=env)
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if _main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    interrupted = False
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # the terminal's Ctrl-C reached torchrun and its workers too
                interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        results = read_results(output_dir)
    except (OSError, ValueError):
        results = None
    if results is None or results.get("config_hash") != spec.config_hash:
        error = f"DDP processes exited with code {code} before writing results.json"
        return {"status": "interrupted" if interrupted else "failed", "error": error}
    if code != 0 and results["status"] in ("running", "interrupted") and not interrupted:
        # A rank died (or torchrun stopped the others after one failed): record it as a failure.
        results = record_failure(output_dir, spec.config_hash, f"DDP process exited with code {code}") or results
    return results


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _quiet_lightning() -> None:
    """Drop Lightning messages that are noise for these runs (the metrics are logged per epoch on purpose)."""
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # Expected when resuming: last.ckpt and best.ckpt are already there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Under DDP: epoch metrics are reduced over devices before they are logged.
    warnings.filterwarnings("ignore", message=r".*recommended to use `self.log\(.*sync_dist=True")
    rank_zero_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropAdverts())


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


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
        traceback = exc.__traceback__
        while traceback is not None:
            frame = traceback.tb_frame
            if frame.f_code.co_name == "run_job" and frame.f_locals.get("output_dir"):
                return str(frame.f_locals["output_dir"])
            traceback = traceback.tb_next
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
