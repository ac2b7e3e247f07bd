"""One job's life, owned here: plan (skip / resume / start / replace), lock, prepare the dir, run, record.

What a run leaves in its dir and its record (:class:`~mbn.train.run_dir.JobRecord`, the only
writer of ``results.json``) are :mod:`mbn.train.run_dir`, below this module. ``mbn-train`` (any
launcher, any process) calls :func:`run_job` per job; sweeps plan and summarize with :func:`plan_job` and :func:`job_outcome`.
Importing it is cheap (no torch or Lightning until a job trains), so a sweep can plan every job
before the first starts.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from mbn.results import RESULTS_FILENAME, read_results
from mbn.train.run_dir import (
    CHECKPOINT,
    RUN_ARTIFACTS,
    RUNS_DIRNAME,
    JobBusy,
    JobPlan,
    JobRecord,
    disk_full_message,
    is_locked,
    job_lock,
    verify_checkpoint,
)
from mbn.utils.io import is_disk_full

if TYPE_CHECKING:
    from mbn.train.spec import RunSpec

log = logging.getLogger("mbn.train")

@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, as a sweep's summary counts it.

    Args:
        status: a results.json status, ``skipped`` (final before this command), or ``busy``
            (another command is running it).
        output_dir: the job's dir.
        error: first line of the error, or why it was skipped.
        elsewhere: another mbn-train command ran it (it is counted once, as that command's).
    """

    status: str
    output_dir: Path
    error: str | None = None
    elsewhere: bool = False


# --- plan -----------------------------------------------------------------------------------------


def plan_job(output_dir: str | Path, config_hash: str, rerun_diverged: bool = False, check_lock: bool = True,
             search: Sequence[Path] = ()) -> JobPlan:
    """Decide what (re)running a job does: from the ``results.json`` in its dir, else from a run of
    the same config in another dir of ``search`` (reads only).

    A run is identified by its config hash, not by its dir's name: ``seed=0`` and ``norm=bn,seed=0``
    are one run when ``norm=bn`` is the default. When the job's own dir holds no run of its config
    (fresh, or another config's), the dirs of ``search`` (:func:`same_config_dirs`) are searched for
    one; found, the plan is that dir's (skip, resume, ...), with ``run_dir`` set to it.

    Args:
        output_dir: the job's dir.
        config_hash: this job's config hash.
        rerun_diverged: restart diverged runs instead of keeping them.
        check_lock: plan ``skip`` when another process holds the job's lock (:func:`job_lock`).
        search: dirs whose job dirs may hold this config's run under another name.
    """
    plan = _plan_dir(output_dir, config_hash, rerun_diverged, check_lock)
    if plan.previous_hash == config_hash or plan.running_elsewhere or not search:
        return plan
    other = find_same_config(config_hash, search, exclude=Path(output_dir))
    if other is None:
        return plan
    return _plan_dir(other, config_hash, rerun_diverged, check_lock=True).elsewhere(other)


def same_config_dirs(spec: "RunSpec") -> list[Path]:
    """Where a job's config may already have a run under another dir name: its sweep (the job dir's
    parent; ``runs/`` for a single run) and the output root's ``runs/``.

    Args:
        spec: the job's run (``config["output_root"]`` names the output root).
    """
    dirs = [Path(spec.output_dir).parent]
    output_root = spec.config.get("output_root") if isinstance(spec.config, dict) else None
    if output_root:
        runs = Path(str(output_root)) / RUNS_DIRNAME
        if runs.resolve() != dirs[0].resolve():
            dirs.append(runs)
    return dirs


# results.json of the dirs searched by find_same_config: path -> ((mtime_ns, size), (hash, status, time)).
_RECORD_INDEX: dict[Path, tuple[tuple[int, int], tuple[str | None, str | None, str]]] = {}


def find_same_config(config_hash: str, search: Sequence[Path], exclude: Path | None = None) -> Path | None:
    """The job dir (a direct child of a ``search`` dir) holding a run of ``config_hash``, if any.

    Of several, one running in another process comes first, then the newest completed, then the
    newest diverged, then the newest other (interrupted, failed, killed).

    Args:
        config_hash: the config's hash.
        search: dirs whose children are job dirs (a sweep dir, the output root's ``runs/``).
        exclude: the job's own dir.
    """
    found: list[tuple[int, str, Path]] = []
    excluded = exclude.resolve() if exclude is not None else None
    for root in dict.fromkeys(Path(d) for d in search):
        if not root.is_dir():
            continue
        for path in root.glob(f"*/{RESULTS_FILENAME}"):
            run_dir = path.parent
            if run_dir.name.startswith(".") or run_dir.resolve() == excluded:
                continue
            digest, status, when = _indexed_record(path)
            if digest != config_hash:
                continue
            rank = 0 if is_locked(run_dir) else {"completed": 1, "diverged": 2}.get(str(status), 3)
            found.append((rank, when, run_dir))
    if not found:
        return None
    best_rank = min(rank for rank, _, _ in found)
    _, newest = max((when, str(run_dir)) for rank, when, run_dir in found if rank == best_rank)
    return Path(newest)


def _indexed_record(path: Path) -> tuple[str | None, str | None, str]:
    """(config hash, status, finish or start time) of one results.json, re-read only when it changed."""
    try:
        stat = path.stat()
    except OSError:
        return None, None, ""
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _RECORD_INDEX.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        data = read_results(path)
        entry = (data.get("config_hash"), data.get("status"), str(data.get("finished_at") or data.get("started_at") or ""))
    except (OSError, ValueError):
        entry = (None, None, "")
    _RECORD_INDEX[path] = (key, entry)
    return entry


def _plan_dir(output_dir: str | Path, config_hash: str, rerun_diverged: bool, check_lock: bool) -> JobPlan:
    """Decide what rerunning a job does, from the ``results.json`` in its dir (reads only).

    ``completed`` (and ``diverged``, unless ``rerun_diverged``) runs of the same config hash are
    final: skipped. Other runs of the same config (``running`` = killed, ``interrupted``, ``failed``)
    resume from ``checkpoints/last.ckpt`` when it exists (:func:`verify_checkpoint` then checks
    that file itself), else start over. An unreadable ``results.json`` beside a ``last.ckpt`` is
    resumed from that checkpoint too (when it is this config's). A run of another config, an
    unreadable ``results.json`` without a checkpoint, or checkpoints without a ``results.json`` are
    replaced (moved aside): they can never be resumed as this job.

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
        if has_checkpoint:
            # A record cut short (a full disk, a copy): the checkpoint, if it is this config's
            # (verify_checkpoint), resumes the run and rebuilds the record; a finished one is not retrained.
            return JobPlan("resume", "unreadable results.json; its checkpoint resumes the run", previous_hash="unreadable")
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

    The caller should hold the job's lock (:func:`job_lock`).

    Args:
        output_dir: the job's dir.
        new_hash: config hash of this job.
        rerun_diverged: restart diverged runs instead of keeping them.

    Returns:
        The recorded status when the job is skipped or resumed (``completed``, ``diverged``,
        ``failed``, ...), None when it starts fresh.
    """
    plan = plan_job(output_dir, new_hash, rerun_diverged, check_lock=False)
    if plan.action == "replace":
        move_aside(output_dir, plan)
        return None
    return plan.previous_status


def move_aside(output_dir: str | Path, plan: JobPlan) -> Path:
    """Move a run that must not be resumed to ``.replaced/<its hash>/`` (hidden: not part of a sweep).

    Args:
        output_dir: the job's dir.
        plan: the ``replace`` plan (its hash names the folder; its reason is logged).

    Returns:
        Where the artifacts went.
    """
    output_dir = Path(output_dir)
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
    return target


# --- run ------------------------------------------------------------------------------------------

# Trains a run in this process (or in processes it starts) and returns its final record.
Trainer = Callable[["RunSpec"], dict]


def run_job(spec: "RunSpec", *, rerun_diverged: bool = False, trainer: Trainer | None = None, locked: bool = True) -> JobOutcome:
    """Run one job to its final status: find its run, lock, plan, check the checkpoint, prepare, train, record.

    A run of the job's config in another dir (:func:`same_config_dirs`) is skipped or resumed there
    (:func:`locate_run`), never trained a second time under the job's own dir name.

    Args:
        spec: the run.
        rerun_diverged: restart a diverged run instead of keeping it.
        trainer: trains the run and returns its record (default: :func:`mbn.train.run.train` in
            this process); e.g. the CLI's launcher of DDP processes.
        locked: take the dir's lock and plan (False for processes that follow a rank 0 which did).

    Returns:
        The outcome (``skipped`` when already final, ``busy`` when another process runs it); its
        ``output_dir`` is where the run is.
    """
    spec, job_dir = locate_run(spec, rerun_diverged, check_lock=locked)
    output_dir = Path(spec.output_dir)
    if not locked:
        if plan_job(output_dir, spec.config_hash, rerun_diverged, check_lock=False).action == "skip":
            return JobOutcome("skipped", output_dir)
        return _outcome(output_dir, _train(spec, trainer))
    try:
        with job_lock(output_dir):
            plan, final = _prepare(spec, rerun_diverged, job_dir)
            return final if final is not None else _outcome(output_dir, _train(spec, trainer))
    except JobBusy as exc:
        return JobOutcome("busy", output_dir, _same_config_note(str(exc), output_dir, job_dir))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # Even the record could not be written: the job failed all the same (a sweep goes on).
        return JobOutcome("failed", output_dir, disk_full_message(exc, output_dir))


def locate_run(spec: "RunSpec", rerun_diverged: bool = False, check_lock: bool = True) -> tuple["RunSpec", Path]:
    """The job's run as it will run: in its own dir, or in the dir that holds its config's run.

    Args:
        spec: the job's run (in its own dir).
        rerun_diverged: restart a diverged run instead of keeping it.
        check_lock: a run found running in another process counts (False for DDP followers).

    Returns:
        The spec to run (its ``output_dir`` and ``run_name`` moved to the found run's dir, if any)
        and the job's own dir.
    """
    job_dir = Path(spec.output_dir)
    plan = plan_job(job_dir, spec.config_hash, rerun_diverged, check_lock=check_lock, search=same_config_dirs(spec))
    if plan.run_dir is None:
        return spec, job_dir
    log.info("%s: the same config's run is %s (%s)", job_dir, plan.run_dir, plan.reason)
    return dataclasses.replace(spec, output_dir=plan.run_dir, run_name=plan.run_dir.name), job_dir


def _same_config_note(text: str, output_dir: Path, job_dir: Path) -> str:
    return text if output_dir == job_dir else f"{text}; the same config as {job_dir}"


def run_pack(specs: Sequence["RunSpec"], *, rerun_diverged: bool = False, callbacks: Sequence[Any] = (),
             conv_paths: str | Mapping[str, str] = "grouped") -> list[JobOutcome]:
    """Run jobs that differ only in their seed as stacked models: :func:`run_job`'s life for each member.

    Every member's dir is locked and planned as :func:`run_job` would (a member running elsewhere is
    ``busy``, a final one ``skipped``, a refused checkpoint ``failed``, another config's run moved
    aside). The members left to train are grouped by the epoch they stand at (0 for a fresh start),
    and each group trains as one job (:func:`mbn.train.train_stack`; a group of one is a single run),
    so members that stopped at different epochs each resume exactly.

    Args:
        specs: the members' runs (same everything but seed and dir).
        rerun_diverged: restart diverged members instead of keeping them.
        callbacks: extra Lightning callbacks for every training.
        conv_paths: the stacked convolutions' paths (:func:`mbn.models.set_conv_paths`).

    Returns:
        One outcome per member, in the order of ``specs``.
    """
    outcomes: dict[int, JobOutcome] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    with ExitStack() as locks:
        specs = list(specs)
        for index, spec in enumerate(specs):
            spec, job_dir = locate_run(spec, rerun_diverged)
            specs[index] = spec
            output_dir = Path(spec.output_dir)
            try:
                locks.enter_context(job_lock(output_dir))
            except JobBusy as exc:
                outcomes[index] = JobOutcome("busy", output_dir, _same_config_note(str(exc), output_dir, job_dir))
                continue
            plan, final = _prepare(spec, rerun_diverged, job_dir)
            if final is not None:
                outcomes[index] = final
            else:
                groups.setdefault(_resume_epoch(output_dir, plan), []).append(index)
        for members in groups.values():
            from mbn.train.run import train_stack  # Lightning import: only once members train

            for index, record in zip(members, train_stack([specs[i] for i in members], callbacks=callbacks, conv_paths=conv_paths)):
                outcomes[index] = _outcome(Path(specs[index].output_dir), record)
    return [outcomes[index] for index in range(len(specs))]


def _prepare(spec: "RunSpec", rerun_diverged: bool, job_dir: Path) -> tuple[JobPlan, JobOutcome | None]:
    """Plan a locked job and act on the plan: its final outcome when it will not train (skipped, or a
    refused checkpoint recorded as failed), else None after moving a replaced run aside. (``job_dir``:
    the job's own dir, named in the outcome when its run is in another.)"""
    output_dir = Path(spec.output_dir)
    plan = verify_checkpoint(plan_job(output_dir, spec.config_hash, rerun_diverged, check_lock=False), output_dir, spec.config_hash)
    if plan.action == "skip":
        # A diverged run stays diverged (exit code 3), skipped or not: one rule for a run and a sweep.
        status = "skipped" if plan.previous_status == "completed" else str(plan.previous_status)
        reason = f"already {plan.previous_status}" if status == "skipped" else f"skipped: already {status}"
        return plan, JobOutcome(status, output_dir, _same_config_note(reason, output_dir, job_dir))
    if plan.action == "refuse":
        record = JobRecord(spec, resume_from=None, keep_history=True).write("failed", error=(plan.reason, None), finished=True)
        return plan, _outcome(output_dir, record)
    if plan.action == "replace":
        move_aside(output_dir, plan)
    return plan, None


def _resume_epoch(output_dir: Path, plan: JobPlan) -> tuple[int, int]:
    """Where a member resumes: its checkpoint's (epoch, global step); (-1, 0) when it starts fresh."""
    if plan.action != "resume":
        return (-1, 0)
    import torch

    # verify_checkpoint loaded this file already; mmap reads only the two counters.
    checkpoint = torch.load(Path(output_dir) / CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
    return (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))


def _train(spec: "RunSpec", trainer: Trainer | None) -> dict:
    if trainer is None:
        from mbn.train.run import train  # Lightning import: only once the job is known to train

        trainer = train
    return trainer(spec)


def _outcome(output_dir: Path, record: dict) -> JobOutcome:
    error = record.get("error")
    return JobOutcome(record["status"], output_dir, str(error).splitlines()[0] if error else None)


def job_outcome(output_dir: str | Path, config_hash: str, plan: JobPlan, invocation: str | None) -> JobOutcome:
    """How a job of a sweep ended, read from its dir after the sweep (any launcher, any process).

    Args:
        output_dir: the job's dir (its run is read from the plan's ``run_dir`` when set).
        config_hash: the job's config hash.
        plan: what the sweep planned for it before it started.
        invocation: this command's :data:`INVOCATION_ENV` (to tell another command's attempts apart).
    """
    job_dir, output_dir = Path(output_dir), Path(plan.run_dir or output_dir)
    if plan.action == "skip" and not plan.running_elsewhere:
        status = "skipped" if plan.previous_status == "completed" else str(plan.previous_status)
        return JobOutcome(status, output_dir, _same_config_note(plan.reason, output_dir, job_dir))
    if is_locked(output_dir):
        return JobOutcome("busy", output_dir, "running in another process", elsewhere=True)
    try:
        record = read_results(output_dir)
    except (OSError, ValueError) as exc:
        return JobOutcome("failed", output_dir, f"no readable results.json ({type(exc).__name__})")
    if record.get("config_hash") != config_hash:
        return JobOutcome("failed", output_dir, "results.json is from another config")
    attempts = record.get("attempts") or []
    last_invocation = attempts[-1].get("invocation") if attempts else None
    elsewhere = invocation is not None and last_invocation is not None and last_invocation != invocation
    status = record.get("status")
    if status == "running":
        return JobOutcome("failed", output_dir, "the job's process ended without a final status (killed?)", elsewhere)
    error = record.get("error")
    return JobOutcome(str(status), output_dir, str(error).splitlines()[0] if error else None, elsewhere)
