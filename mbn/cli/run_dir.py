"""What a (re)run does with a job's dir: start, resume, skip or replace — decided from ``results.json``.

:func:`plan_job` only reads (the dry-run listing uses it); :func:`prepare_output_dir` also acts on
the plan (moves a different config's run aside). Pure Python: no torch or Lightning import.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mbn.results import RESULTS_FILENAME, read_results

log = logging.getLogger("mbn.cli")

# Run artifacts moved aside (to .replaced/<old hash>/) when a dir holds a run that must not be resumed.
RUN_ARTIFACTS = (RESULTS_FILENAME, "checkpoints", "csv", "tensorboard", "wandb")
CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Held (flock) by the process running a job: a second command never trains the same dir at once.
LOCK_FILENAME = ".lock"
# What a job does: run fresh, resume from last.ckpt, skip (final result there), or move the dir's
# run aside and run fresh (another config, an unreadable record, or a diverged run to redo).
ACTIONS = ("start", "resume", "skip", "replace")


@dataclass(frozen=True)
class JobPlan:
    """What a (re)run of one job will do.

    Args:
        action: one of :data:`ACTIONS`.
        reason: a few words for the listing (``completed``, ``interrupted at epoch 3``, ...).
        previous_status: the status recorded in the dir (None for a fresh dir).
        previous_hash: the config hash recorded in the dir (None for a fresh dir).
    """

    action: str
    reason: str
    previous_status: str | None = None
    previous_hash: str | None = None


def plan_job(output_dir: str | Path, config_hash: str, rerun_diverged: bool = False, check_lock: bool = True) -> JobPlan:
    """Decide what rerunning a job does, from the ``results.json`` in its dir (reads only).

    ``completed`` (and ``diverged``, unless ``rerun_diverged``) runs of the same config hash are
    final: skipped. Other runs of the same config (``running`` = killed, ``interrupted``, ``failed``)
    resume from ``checkpoints/last.ckpt`` when it exists, else start over. A run of another config,
    an unreadable ``results.json``, or checkpoints without one are replaced (moved aside): they can
    never be resumed as this job.

    Args:
        output_dir: the job's dir.
        config_hash: this job's config hash.
        rerun_diverged: restart diverged runs instead of keeping them.
        check_lock: plan ``skip`` when another process holds the job's lock (:func:`job_lock`).
    """
    output_dir = Path(output_dir)
    if check_lock and is_locked(output_dir):
        return JobPlan("skip", "running in another process")
    has_checkpoint = (output_dir / CHECKPOINT).is_file()
    if not (output_dir / RESULTS_FILENAME).exists():
        if has_checkpoint:
            return JobPlan("replace", "checkpoints without a results.json")
        return JobPlan("start", "new")
    try:
        previous = read_results(output_dir)
        old_hash, status = previous.get("config_hash"), previous.get("status")
    except (OSError, ValueError):
        return JobPlan("replace", "unreadable results.json", previous_hash="unreadable")
    if old_hash != config_hash:
        return JobPlan("replace", f"holds another config (hash {old_hash})", status, old_hash)
    if status == "completed":
        return JobPlan("skip", "completed", status, old_hash)
    if status == "diverged":
        if rerun_diverged:
            return JobPlan("replace", "diverged, rerun_diverged=true", status, old_hash)
        return JobPlan("skip", "diverged (final; rerun_diverged=true restarts it)", status, old_hash)
    epochs = previous.get("epochs_completed") or 0
    state = "killed" if status == "running" else status
    if has_checkpoint:
        return JobPlan("resume", f"{state} after epoch {epochs}", status, old_hash)
    return JobPlan("start", f"{state} before its first checkpoint", status, old_hash)


def prepare_output_dir(output_dir: str | Path, new_hash: str, rerun_diverged: bool = False) -> str | None:
    """Plan a job (:func:`plan_job`) and clear its dir when the plan says ``replace``.

    A replaced run is moved to ``.replaced/<its hash>/`` so it can neither be resumed nor be
    mistaken for this job's result (hidden dirs are not part of a sweep). The caller should hold
    the job's lock (:func:`job_lock`).

    Args:
        output_dir: the job's dir.
        new_hash: config hash of this job.
        rerun_diverged: restart diverged runs instead of keeping them.

    Returns:
        The recorded status when the job is skipped or resumed (``completed``, ``diverged``,
        ``failed``, ...), None when it starts fresh.
    """
    output_dir = Path(output_dir)
    plan = plan_job(output_dir, new_hash, rerun_diverged, check_lock=False)
    if plan.action != "replace":
        return plan.previous_status
    name = str(plan.previous_hash or "unknown")
    target = output_dir / ".replaced" / name
    suffix = 1
    while target.exists():
        suffix += 1
        target = output_dir / ".replaced" / f"{name}-{suffix}"
    target.mkdir(parents=True)
    for artifact in RUN_ARTIFACTS:
        if (output_dir / artifact).exists():
            shutil.move(str(output_dir / artifact), str(target / artifact))
    log.warning("%s: %s; moved it to %s", output_dir, plan.reason, target)
    return None


class JobBusy(RuntimeError):
    """Another process is running this job (it holds the dir's lock)."""


@contextmanager
def job_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``output_dir/.lock`` while a job runs; released when the process dies, even by SIGKILL.

    Raises:
        JobBusy: another process holds the lock.
    """
    path = Path(output_dir) / LOCK_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobBusy(f"{output_dir} is being run by another process") from None
        yield
    finally:
        os.close(fd)


def is_locked(output_dir: str | Path) -> bool:
    """Whether another process holds the job's lock (see :func:`job_lock`)."""
    path = Path(output_dir) / LOCK_FILENAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False
