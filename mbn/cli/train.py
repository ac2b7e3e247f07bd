"""``mbn-train [overrides]``: one training run, or a sweep with ``-m`` (Hydra multirun).

Examples::

    mbn-train norm=mbn data.batch_size=2 epochs=30
    mbn-train -m norm=bn,gn,brn,mbn data.batch_size=2,4,8,16,32 seed=0,1,2
    mbn-train -m experiment=demo dry_run=true               # list what would run, skip, resume
    mbn-train -m experiment=demo hydra/launcher=joblib hydra.launcher.n_jobs=2
    mbn-train -m experiment=paper_cifar10 hydra/launcher=slurm hydra.launcher.partition=gpu
    mbn-train trainer=ddp trainer.devices=4 data.batch_size=8     # m=8 per GPU, global batch 32

Each job runs in a deterministic dir (``<output_root>/runs/<overrides>`` or
``<output_root>/sweeps/<sweep_name>/<overrides>``) and holds its lock while it runs. Rerunning a
command skips jobs whose ``results.json`` says ``completed`` (or ``diverged``, unless
``rerun_diverged=true``) for the same config hash, resumes the others from their ``last.ckpt``,
and moves a dir's run of another config aside. A failing job never stops a sweep; before the
first job starts every job's config is checked (see :mod:`mbn.cli.sweep`). DDP jobs
(``trainer.devices > 1``) run as that many processes started with torchrun, also inside a sweep.
Exit code: 0 when every job completed (or was skipped as completed), 1 if one failed, 2 for an
invalid config or an unwritable output dir, 3 if one diverged, 130 when interrupted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mbn.cli import sweep
from mbn.cli.config import CONFIG_DIR, ConfigError, check_buildable, resolve, run_spec, split_control, validate
from mbn.cli.run_dir import LOCK_FILENAME, JobBusy, job_lock, plan_job, prepare_output_dir
from mbn.results import config_hash, read_results, write_results

log = logging.getLogger("mbn.cli")

EXIT_CODES = sweep.EXIT_CODES
# Set in the torchrun processes mbn-train starts for a DDP job: the parent already planned the dir.
DDP_CHILD_ENV = "MBN_DDP_CHILD"
# DDP strategies whose processes mbn-train launches itself (torchrun) instead of Lightning re-running argv.
RELAUNCHED_STRATEGIES = ("ddp", "auto")

__all__ = ["main", "prepare_output_dir", "run_job", "EXIT_CODES"]

# Final status of a single (non-multirun) run in this process; sweeps are summarized by mbn.cli.sweep.
_run_status: list[str] = []
# A joblib worker keeps the slot (GPU, threads) of its first job: CUDA_VISIBLE_DEVICES only counts
# before CUDA starts in a process, and the worker serves its later jobs from the same process.
_worker_slot: dict[str, Any] = {}


def run_job(cfg: DictConfig) -> str:
    """Validate, then skip, resume or start one job; returns its final status.

    Raises:
        ConfigError: invalid config (before any heavy import).
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    config, control = split_control(resolve(cfg))
    validate(config)
    digest = config_hash(config)
    if control["dry_run"]:
        plan = plan_job(output_dir, digest, control["rerun_diverged"])
        print(sweep.format_plan(output_dir, plan), flush=True)
        return "dry_run"

    spec = run_spec(config, output_dir, output_dir.name, overrides, digest)
    check_buildable(spec)
    callbacks = []
    if control["fail_at_epoch"] is not None:
        from mbn.train.callbacks import FailAtEpoch

        callbacks.append(FailAtEpoch(control["fail_at_epoch"]))

    if os.environ.get(DDP_CHILD_ENV):
        # One of the DDP processes this job's own mbn-train started: the parent planned and locked
        # the dir, and reports the outcome.
        return _train(spec, callbacks, report=False)
    rank = _external_rank()
    if rank is not None and rank > 0:
        # Started by a cluster launcher (SLURM tasks, torchrun): rank 0 decides; the others follow it.
        if plan_job(output_dir, digest, control["rerun_diverged"], check_lock=False).action == "skip":
            return "skipped"
        return _train(spec, callbacks)
    try:
        with job_lock(output_dir):
            previous = prepare_output_dir(output_dir, digest, control["rerun_diverged"])
            if previous in ("completed", "diverged"):
                print(f"mbn-train: skipped {output_dir} (already {previous}, config hash {digest})", flush=True)
                return "skipped"
            _pin_parallel_job(spec, hydra_cfg)
            if rank is None and spec.trainer.world_size > 1 and spec.trainer.strategy in RELAUNCHED_STRATEGIES:
                if spec.trainer.num_nodes > 1:
                    raise ConfigError("trainer.num_nodes", f"{spec.trainer.num_nodes} nodes need a cluster launcher "
                                      "(hydra/launcher=slurm) that starts one process per device")
                return _train_ddp_processes(spec, overrides)
            return _train(spec, callbacks)
    except JobBusy as exc:
        print(f"mbn-train: skipped {output_dir} ({exc})", flush=True)
        return "skipped"


def _train(spec: Any, callbacks: list, report: bool = True) -> str:
    """Train in this process and (with ``report``) print the run's one-line outcome."""
    from mbn.train.run import train  # Lightning import: only once the config is known to be good

    _quiet_lightning()
    try:
        results = train(spec, callbacks=callbacks)
    except OSError as exc:
        # results.json itself could not be written (read-only or full disk): nothing else can record it.
        print(f"mbn-train: failed {spec.output_dir} - cannot write its results: {exc}", file=sys.stderr, flush=True)
        return "failed"
    if report:
        _print_outcome(spec.output_dir, results)
    return results["status"]


def _print_outcome(output_dir: Path, results: dict[str, Any]) -> None:
    from mbn.train.run import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    metrics = results.get("metrics") or {}
    summary = f"mbn-train: {results['status']} {output_dir}"
    if metrics.get("final_val_acc1") is not None:
        summary += f": final val acc1 {metrics['final_val_acc1']:.4f}, best {metrics['best_val_acc1']:.4f} (epoch {metrics['best_epoch']})"
    summary += f", {results.get('wall_time_s', 0):.1f} s"
    if results.get("error"):
        summary += f" - {str(results['error']).splitlines()[0]}"
    print(summary, flush=True)


def _external_rank() -> int | None:
    """This process's global rank when a cluster launcher started several (SLURM tasks, torchrun), else None."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return None


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
    if not _worker_slot:
        _worker_slot["slot"] = int(hydra_cfg.job.num) % n_jobs
        gpu = spec.trainer.accelerator in ("gpu", "cuda", "auto")
        _worker_slot["gpu_ids"] = visible_gpu_ids() if gpu else []
    resources = job_resources(_worker_slot["slot"], n_jobs, cores, _worker_slot["gpu_ids"], spec.trainer.devices)
    if resources.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = resources.cuda_visible_devices
    if spec.trainer.num_threads is None:
        spec.trainer.num_threads = resources.num_threads


def _train_ddp_processes(spec: Any, overrides: list[str]) -> str:
    """Run a DDP job as ``trainer.devices`` processes started with torchrun, and wait for them.

    Lightning's own DDP launcher re-runs ``sys.argv``, which inside a Hydra multirun (or a joblib /
    submitit worker) is the whole sweep or not mbn-train at all. Instead each process runs exactly
    this job: its overrides, with ``hydra.run.dir`` set to the job's dir. Rank 0 writes results.json.
    """
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
        print(f"mbn-train: failed {output_dir} - DDP processes exited with code {code} before writing results.json",
              file=sys.stderr, flush=True)
        return "interrupted" if interrupted else "failed"
    if code != 0 and results["status"] in ("running", "interrupted") and not interrupted:
        # A rank died (or torchrun stopped the others after one failed): record it as a failure.
        results = {**results, "status": "failed", "error": results.get("error") or f"DDP process exited with code {code}"}
        results.pop("schema_version", None)
        write_results(output_dir, results)
    _print_outcome(output_dir, results)
    return results["status"]


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
        status = run_job(cfg)
    except ConfigError as exc:
        print(f"mbn-train: invalid config: {exc}", file=sys.stderr, flush=True)
        _remove_if_only_bookkeeping(Path(hydra_cfg.runtime.output_dir))
        if multirun:  # (the sweep checks every job's config first; this is a last line of defense)
            return
        raise SystemExit(EXIT_CODES["config_error"]) from None
    if not multirun:
        if status == "dry_run":
            _remove_if_only_bookkeeping(Path(hydra_cfg.runtime.output_dir))
        _run_status.append(status)
    elif status == "interrupted" and "BasicLauncher" in str(hydra_cfg.launcher.get("_target_", "")):
        # Stop the whole sweep: the user (or the scheduler) asked to stop. (Jobs of other launchers
        # run in other processes; their launcher stops on its own, and the sweep summary reports it.)
        raise SystemExit(EXIT_CODES["interrupted"])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``mbn-train``).

    Args:
        argv: command-line arguments without the program name; None = ``sys.argv[1:]``.

    Returns:
        The exit code: 0 when every job completed (or was skipped), 1 if one failed, 2 for an
        invalid config (of any job of a sweep: checked before the first starts) or an unwritable
        output dir, 3 if one diverged, 130 when interrupted.
    """
    _run_status.clear()
    sweep.reset()
    saved_argv = sys.argv
    if argv is not None:
        sys.argv = [saved_argv[0] if saved_argv else "mbn-train", *argv]
    try:
        _hydra_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            return code
    finally:
        sys.argv = saved_argv
    summary = sweep.last_summary()
    if summary is not None:
        return summary.exit_code
    return max((EXIT_CODES.get(status, 1) for status in _run_status), default=0)


if __name__ == "__main__":
    sys.exit(main())
