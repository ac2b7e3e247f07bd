"""The run directory: its file names, its record (``results.json``) and its checkpoint's identity.

The bottom of :mod:`mbn.train`: what a run leaves in its dir and how it is checked, used by the
job owner (:mod:`mbn.train.job`, which plans and runs jobs) and by the code that trains a run
(:mod:`mbn.train.run`), none of which it imports. :class:`JobRecord`
is the only writer of ``results.json`` (the record's type and schema are
:class:`mbn.results.RunRecord`). Importing it is cheap (no torch or Lightning).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from mbn.results import (
    LOCK_FILENAME,
    RESULTS_FILENAME,
    RunRecord,
    now_iso,
    overwrite_results,
    read_results,
    summarize_history,
    write_results,
)
from mbn.utils.io import FileLockBusy, hold_file_lock, is_disk_full, is_file_locked

if TYPE_CHECKING:
    from mbn.train.spec import RunSpec

log = logging.getLogger("mbn.train")

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
CHECKPOINT = Path(CHECKPOINT_DIR) / LAST_CHECKPOINT
# Key of the config hash inside every checkpoint (see verify_checkpoint).
CHECKPOINT_HASH_KEY = "mbn_config_hash"
# Run artifacts moved aside (to .replaced/<old hash>/) when a dir holds a run that must not be resumed.
RUN_ARTIFACTS = (RESULTS_FILENAME, CHECKPOINT_DIR, "csv", "tensorboard", "wandb")
# Names one mbn-train command (all its jobs, in any process it starts); recorded in each attempt so
# a sweep's summary can tell its own jobs from those another command ran in the same dirs.
INVOCATION_ENV = "MBN_INVOCATION"
# The output root's dir of single runs (``hydra.run.dir`` in configs/train.yaml): a run of a job's
# config may already be there (see same_config_dirs).
RUNS_DIRNAME = "runs"
# What a job does: run fresh, resume from last.ckpt, skip (final result there, or running
# elsewhere), move the dir's run aside and run fresh, or refuse (a checkpoint it will not load).
ACTIONS = ("start", "resume", "skip", "replace", "refuse")


@dataclass(frozen=True)
class JobPlan:
    """What a (re)run of one job will do.

    Args:
        action: one of :data:`ACTIONS`.
        reason: a few words for the listing (``completed``, ``interrupted at epoch 3``, ...).
        previous_status: the status recorded in the dir (None for a fresh dir).
        previous_hash: the config hash recorded in the dir (None for a fresh dir).
        run_dir: set when this config's run is in another dir (a sibling job dir of another name,
            or the output root's runs): the job is skipped or resumed there, not in its own dir.
    """

    action: str
    reason: str
    previous_status: str | None = None
    previous_hash: str | None = None
    run_dir: Path | None = None

    @property
    def running_elsewhere(self) -> bool:
        """Another process holds the job's lock."""
        return self.action == "skip" and self.previous_status is None

    def line(self, output_dir: Path) -> str:
        """One dry-run line: ``mbn-train: would resume <dir> (interrupted after epoch 3)``; for a run
        found in another dir, ``... (completed; the same config as <job dir>)``."""
        where = self.run_dir or output_dir
        if self.action == "refuse":
            return f"mbn-train: cannot resume {where}: {self.reason}"
        elsewhere = f"; the same config as {output_dir}" if self.run_dir is not None else ""
        return f"mbn-train: would {self.action} {where} ({self.reason}{elsewhere})"

    def elsewhere(self, run_dir: Path) -> "JobPlan":
        """This plan (made for ``run_dir``, another dir holding the job's config) as the job's plan."""
        return dataclasses.replace(self, run_dir=Path(run_dir))


# --- checkpoint identity ------------------------------------------------------------------------


def verify_checkpoint(plan: JobPlan, output_dir: str | Path, config_hash: str) -> JobPlan:
    """Check the ``last.ckpt`` a ``resume`` plan would load: is it loadable, and this config's?

    A checkpoint that records another config hash (copied from another run) or none is never
    resumed: the plan becomes ``replace``. One that cannot be loaded weights-only (corrupt, or
    holding pickled code) becomes ``refuse``, with the message that says to remove it. Other
    plans are returned unchanged. (Imports torch.)

    Args:
        plan: :func:`plan_job`'s plan.
        output_dir: the job's dir.
        config_hash: this job's config hash.
    """
    if plan.action != "resume":
        return plan
    import torch

    from mbn.train.checkpoint_io import checkpoint_refusal_message

    path = Path(plan.run_dir or output_dir) / CHECKPOINT
    try:
        # mmap: only the few bytes of the hash are read, however large the weights.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        return dataclasses.replace(plan, action="refuse", reason=checkpoint_refusal_message(path, exc))
    recorded = checkpoint.get(CHECKPOINT_HASH_KEY) if isinstance(checkpoint, dict) else None
    if recorded != config_hash:
        found = f"hash {recorded}" if recorded else "no config hash"
        return dataclasses.replace(plan, action="replace",
                                   reason=f"{CHECKPOINT} is from another config ({found}, this run's is {config_hash})")
    return plan


# --- lock -----------------------------------------------------------------------------------------


class JobBusy(RuntimeError):
    """Another process is running this job (it holds the dir's lock)."""


@contextmanager
def job_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``output_dir/.lock`` while a job runs; released when the process dies, even by SIGKILL.

    Raises:
        JobBusy: another process holds the lock.
    """
    try:
        with hold_file_lock(Path(output_dir) / LOCK_FILENAME):
            yield
    except FileLockBusy:
        raise JobBusy(f"{output_dir} is being run by another process") from None


def is_locked(output_dir: str | Path) -> bool:
    """Whether another process holds the job's lock (see :func:`job_lock`)."""
    return is_file_locked(Path(output_dir) / LOCK_FILENAME)


# --- record ---------------------------------------------------------------------------------------


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The run's ``last.ckpt`` if it exists (what a rerun resumes from)."""
    path = Path(output_dir) / CHECKPOINT
    return path if path.is_file() else None


class JobRecord:
    """The ``results.json`` of one attempt of a run: the only code that writes that file.

    It keeps the attempts (and, until a resumed checkpoint restores them, the epochs) that earlier
    attempts of the same config recorded. Under DDP only rank 0 writes.

    Args:
        spec: the run.
        resume_from: the checkpoint this attempt resumes from, if any.
        rank: this process's global rank (only rank 0 writes).
        versions: library versions to record.
        keep_history: keep the epochs earlier attempts recorded (default: only when resuming).
    """

    def __init__(self, spec: "RunSpec", resume_from: Path | None, rank: int = 0, versions: dict[str, str] | None = None,
                 keep_history: bool | None = None) -> None:
        self.output_dir = Path(spec.output_dir)
        self.rank = rank
        self.started = time.time()
        self.base = RunRecord.for_run(spec, started_at=now_iso(self.started), resume_from=resume_from, versions=versions or {})
        self.earlier_history, self.earlier_attempts = _earlier_record(self.output_dir, spec.config_hash)
        if not (resume_from is not None if keep_history is None else keep_history):
            self.earlier_history = []
        self.attempt = {
            "started_at": now_iso(self.started),
            "finished_at": None,
            "status": "running",
            "resumed_from": str(resume_from) if resume_from is not None else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "invocation": os.environ.get(INVOCATION_ENV),
            "num_threads": spec.trainer.num_threads,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def write(self, status: str, history: Sequence[dict[str, Any]] | None = None, error: tuple[str, str | None] | None = None,
              finished: bool = False) -> dict[str, Any]:
        """Write the record with this status and history (``None``: what earlier attempts recorded).

        Args:
            status: one of :data:`mbn.results.STATUSES`.
            history: the epochs finished so far.
            error: ``(message, traceback)`` of a failure.
            finished: this attempt is over (sets ``finished_at``).

        Returns:
            The record as written.
        """
        finished_at = now_iso() if finished else None
        seconds = round(time.time() - self.started, 3)
        attempt = {**self.attempt, "status": status, "finished_at": finished_at, "wall_time_s": seconds}
        record = self.base.updated(
            status=status,
            error=error[0] if error else None,
            traceback=error[1] if error else None,
            finished_at=finished_at,
            wall_time_s=seconds,
            attempts=[*self.earlier_attempts, attempt],
            **summarize_history(list(history) if history else self.earlier_history),
        )
        data = record.to_dict()
        if self.rank == 0:
            try:
                write_results(self.output_dir, data)
            except OSError as exc:
                # On a full disk the final status still goes over the record's own blocks: a dead
                # process must not leave "running" behind when that can be helped.
                if not (finished and is_disk_full(exc) and overwrite_results(self.output_dir, data)):
                    raise
        return data


def _earlier_record(output_dir: Path, config_hash: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """History and attempts recorded by earlier attempts of this same config in ``output_dir``."""
    try:
        earlier = read_results(output_dir)
    except (OSError, ValueError):
        return [], []
    if earlier.get("config_hash") != config_hash:
        return [], []
    attempts = [dict(attempt) for attempt in earlier.get("attempts") or []]
    if attempts and "wall_time_s" not in attempts[-1] and earlier.get("wall_time_s") is not None:
        # Written before attempts carried their seconds: the record's are the last attempt's, about to be replaced.
        attempts[-1]["wall_time_s"] = earlier["wall_time_s"]
    return list(earlier.get("history") or []), attempts


def record_failure(output_dir: str | Path, config_hash: str, message: str) -> dict[str, Any] | None:
    """Mark a run whose processes died without a final status as ``failed`` (keeping its history).

    Used when the processes that trained the run (DDP ranks) exited without recording the end.

    Args:
        output_dir: the run's dir.
        config_hash: the run's config hash (another config's record is left alone).
        message: the error to record.

    Returns:
        The record as written, or None when there is no record of this config to update.
    """
    try:
        data = read_results(output_dir)
    except (OSError, ValueError):
        return None
    if data.get("config_hash") != config_hash:
        return None
    attempts = list(data.get("attempts") or [])
    if attempts and attempts[-1].get("status") in ("running", "interrupted"):
        attempts[-1] = {**attempts[-1], "status": "failed", "finished_at": now_iso()}
    record = RunRecord.from_dict(data).updated(status="failed", error=data.get("error") or message, attempts=attempts)
    data = record.to_dict()
    write_results(output_dir, data)
    return data


def disk_full_message(exc: BaseException | str, output_dir: str | Path) -> str:
    """One line for a job that a full disk stopped: what could not be written, or else the job's dir.

    Args:
        exc: the error (or its message).
        output_dir: the job's dir.
    """
    text = str(exc)
    return text if "disk is full" in text or str(output_dir) in text else f"{text} (writing in {output_dir})"
