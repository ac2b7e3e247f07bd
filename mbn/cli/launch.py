"""How ``mbn-train`` places and runs a job: joblib worker slots (GPU and threads), DDP processes it
starts itself, and Lightning's messages that are noise for these runs.

Launcher-specific code, kept out of the task function (:mod:`mbn.cli.train`): a joblib worker pins
its job to a share of the machine; a multi-device job without a cluster launcher runs as
``trainer.devices`` processes started with torchrun, each running exactly this job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import OmegaConf

from mbn.cli.config import ConfigError
from mbn.cli.report import print_outcome
from mbn.cli.sweep import EXIT_CODES, group_stack_size, member_spec, probe_for, split_pack
from mbn.train.job import JobOutcome, run_job, run_pack
from mbn.train.run_dir import record_failure

# Set in the torchrun processes mbn-train starts for a DDP job: the parent already planned the dir.
DDP_CHILD_ENV = "MBN_DDP_CHILD"
# DDP strategies whose processes mbn-train launches itself (torchrun) instead of Lightning re-running argv.
RELAUNCHED_STRATEGIES = ("ddp", "auto")


def external_rank() -> int | None:
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


def pin_parallel_job(spec: Any, hydra_cfg: Any) -> None:
    """Under the joblib launcher, give the job its GPU(s) and its share of the CPU threads."""
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a single run of a config that names a launcher runs alone
        return
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


def train_ddp_processes(spec: Any, overrides: list[str]) -> dict:
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


def quiet_lightning() -> None:
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


def launch_job(job: Any, spec: Any, overrides: list[str], hydra_cfg: Any) -> Any:
    """Run a checked job where and how its launcher and trainer settings say; its outcome.

    A DDP process this command started trains and reports (the parent planned and locked the dir);
    ranks > 0 of a cluster launcher follow rank 0's plan; a multi-device job without one runs as
    torchrun processes; a pack of stacked seeds trains as one job (each member printed); any other
    job runs in this process. Every path but the DDP children goes through
    :func:`mbn.train.job.run_job` / :func:`~mbn.train.job.run_pack` (plan, lock, record).

    Args:
        job: the composed job (:class:`mbn.cli.schema.Job`).
        spec: its run (:class:`mbn.train.spec.RunSpec`).
        overrides: the job's command-line overrides (the DDP processes get them).
        hydra_cfg: Hydra's config of this job.

    Returns:
        The job's :class:`~mbn.train.job.JobOutcome` (for a pack, its worst member's).

    Raises:
        ConfigError: several nodes without a cluster launcher.
    """
    callbacks = job.debug_callbacks()

    def train_here(run: Any) -> dict:
        from mbn.train.run import train  # Lightning import: only once the job is known to train

        quiet_lightning()
        return train(run, callbacks=callbacks)

    if os.environ.get(DDP_CHILD_ENV):
        return JobOutcome(train_here(spec)["status"], Path(spec.output_dir))
    rank = external_rank()
    if rank is not None and rank > 0:
        return run_job(spec, rerun_diverged=job.rerun_diverged, trainer=train_here, locked=False)
    pin_parallel_job(spec, hydra_cfg)
    relaunch = rank is None and spec.trainer.world_size > 1 and spec.trainer.strategy in RELAUNCHED_STRATEGIES
    if relaunch and spec.trainer.num_nodes > 1:
        raise ConfigError("trainer.num_nodes", f"{spec.trainer.num_nodes} nodes need a cluster launcher "
                          "(hydra/launcher=slurm) that starts one process per device")
    values = job.train.pack_values()
    if len(values) > 1:
        quiet_lightning()
        stacks = [values]
        if job.train.stack_path == "auto":  # stack=auto: the K this shape trains fastest at, from the sweep's (cached) probes
            stacks = split_pack(values, group_stack_size(spec, len(job.train.stack_values or values))[0])
        outcomes = []
        for stacked_values in stacks:
            members = [member_spec(job, spec, job.train.stack_key, value) for value in stacked_values]
            # stack_path=auto: each layer's faster path, from the probe of this K.
            conv_paths = probe_for(spec, len(members)).conv_paths if job.train.stack_path == "auto" else job.train.stack_path
            outcomes += run_pack(members, rerun_diverged=job.rerun_diverged, callbacks=callbacks, conv_paths=conv_paths)
        for outcome in outcomes:
            print_outcome(outcome)
        # The sweep counts every member from its dir; this job reports its worst member.
        return max(outcomes, key=lambda outcome: EXIT_CODES.get(outcome.status, 1))
    trainer = (lambda run: train_ddp_processes(run, overrides)) if relaunch else train_here
    outcome = run_job(spec, rerun_diverged=job.rerun_diverged, trainer=trainer)
    print_outcome(outcome)
    return outcome
