"""Sweep-level checks and reports of ``mbn-train -m``, for any Hydra launcher.

:class:`SweepCallback` (a Hydra callback, set in ``configs/train.yaml``) runs in the process that
launches the jobs, whichever launcher runs them (in-process, joblib workers, SLURM via submitit):

- before the first job starts, every job's config is composed, resolved and validated; one bad
  swept value stops the sweep before any training (exit 2), listing every bad job;
- with ``dry_run=true`` it lists what each job would do (start, resume, skip, replace) and stops;
- after the last job it prints one summary line (completed / failed / diverged / skipped counts)
  and the dirs of the jobs that did not complete, read from their ``results.json``; ``mbn-train``
  turns it into the exit code.

The job list is the one Hydra's basic sweeper builds (``hydra.sweeper.params`` then command-line
overrides); with another sweeper the callback does nothing.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from mbn.cli.config import ConfigError, check_buildable, resolve, run_spec, split_control, validate
from mbn.cli.run_dir import JobPlan, plan_job
from mbn.results import config_hash, read_results

EXIT_CODES = {"completed": 0, "skipped": 0, "dry_run": 0, "failed": 1, "busy": 1, "config_error": 2, "diverged": 3, "interrupted": 130}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class SweepJob:
    """One job of a sweep as planned before launch.

    Args:
        overrides: the job's overrides.
        output_dir: its dir.
        config_hash: hash of its resolved config (None when invalid).
        plan: what it will do (None when invalid).
        error: why its config is invalid (None when valid).
    """

    overrides: list[str]
    output_dir: Path | None = None
    config_hash: str | None = None
    plan: JobPlan | None = None
    error: str | None = None


@dataclass
class SweepSummary:
    """Final status of every job of a sweep.

    Args:
        jobs: ``(status, output_dir, error)`` per job, in launch order; status is a results.json
            status, ``skipped`` (already final before the sweep), or ``busy`` (another process runs it).
    """

    jobs: list[tuple[str, Path, str | None]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Jobs per status."""
        counts: dict[str, int] = {}
        for status, _, _ in self.jobs:
            counts[status] = counts.get(status, 0) + 1
        return counts

    @property
    def exit_code(self) -> int:
        """0 when every job completed or was skipped as completed, else the worst status's code."""
        return max((EXIT_CODES.get(status, 1) for status, _, _ in self.jobs), default=0)

    def lines(self) -> list[str]:
        """The summary line, then one line per job that did not complete."""
        order = ("completed", "failed", "diverged", "interrupted", "busy", "skipped")
        counts = self.counts()
        parts = [f"{counts.get(status, 0)} {status}" for status in order if status in counts or status in ("completed", "failed", "skipped")]
        lines = [f"mbn-train: sweep done: {', '.join(parts)} (of {len(self.jobs)} jobs)"]
        for status, output_dir, error in self.jobs:
            if status not in ("completed", "skipped"):
                lines.append(f"mbn-train:   {status}: {output_dir}" + (f" - {error.splitlines()[0]}" if error else ""))
        return lines


_last: list[SweepSummary] = []


def reset() -> None:
    """Forget the previous sweep's summary (``mbn-train`` calls this before each command)."""
    _last.clear()


def last_summary() -> SweepSummary | None:
    """Summary of the last sweep run in this process, if any."""
    return _last[-1] if _last else None


def format_plan(output_dir: Path, plan: JobPlan) -> str:
    """One dry-run line: ``mbn-train: would resume <dir> (interrupted after epoch 3)``."""
    return f"mbn-train: would {plan.action} {output_dir} ({plan.reason})"


def ensure_writable(directory: str | Path) -> None:
    """Create ``directory`` and check a file can be written there.

    Raises:
        ConfigError: naming ``output_root`` and the dir, when it cannot be written.
    """
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError("output_root", f"cannot write to {directory}: {exc.strerror or exc}") from None


def expand_jobs(config: DictConfig) -> list[SweepJob] | None:
    """Every job of the multirun ``config`` with its dir, config hash and plan, or its config error.

    Returns None when the sweep does not use Hydra's basic sweeper (the job list is then unknown).

    Args:
        config: the multirun's master config (with its ``hydra`` node).
    """
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = OmegaConf.to_container(config.hydra.sweeper.params) if config.hydra.sweeper.get("params") else {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    (job_overrides,) = BasicSweeper.split_arguments(parsed, None)
    hydra_config = HydraConfig.instance().cfg
    built: dict[str, ConfigError | None] = {}
    jobs = []
    try:
        for overrides in job_overrides:
            jobs.append(_plan_one(loader, config, list(overrides), built))
    finally:
        if hydra_config is not None:
            HydraConfig.instance().set_config(hydra_config)
    first_job_of_dir: dict[Path, SweepJob] = {}
    for job in jobs:
        if job.output_dir is None or job.error is not None:
            continue
        other = first_job_of_dir.setdefault(job.output_dir, job)
        if other is not job:
            # Overrides of keys left out of dir names (output location, loggers, control keys) cannot be swept.
            job.error = f"same dir as job {' '.join(other.overrides)} ({job.output_dir}): sweep only keys that name the job's dir"
    return jobs


def _plan_one(loader: Any, config: DictConfig, overrides: list[str], built: dict[str, ConfigError | None]) -> SweepJob:
    job = SweepJob(overrides)
    try:
        job_config = loader.load_sweep_config(config, overrides)
        job.output_dir = Path(str(OmegaConf.select(job_config, "hydra.sweep.dir"))) / str(
            OmegaConf.select(job_config, "hydra.sweep.subdir")
        )
        HydraConfig.instance().set_config(job_config)
        task_config = OmegaConf.create(OmegaConf.to_container(job_config, resolve=False))
        with open_dict(task_config):
            del task_config["hydra"]
        resolved, control = split_control(resolve(task_config))
        validate(resolved)
        _check_buildable_once(resolved, job.output_dir, built)
    except ConfigError as exc:
        job.error = str(exc)
        return job
    except Exception as exc:  # noqa: BLE001 - Hydra composition errors (e.g. an unknown group option)
        job.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return job
    job.config_hash = config_hash(resolved)
    job.plan = plan_job(job.output_dir, job.config_hash, control["rerun_diverged"])
    return job


def _check_buildable_once(config: dict[str, Any], output_dir: Path, built: dict[str, ConfigError | None]) -> None:
    """Build each distinct (model, norm) once, as the job would, to catch bad layer options up front."""
    key = repr((config["model"], config["norm"]))
    if key not in built:
        try:
            check_buildable(run_spec(config, output_dir, output_dir.name, [], ""))
            built[key] = None
        except ConfigError as exc:
            built[key] = exc
    if built[key] is not None:
        raise built[key]


class SweepCallback(Callback):
    """Hydra callback: check and plan every job before a sweep, summarize it after (see module doc)."""

    def __init__(self) -> None:
        self.jobs: list[SweepJob] | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_unwritable(str(OmegaConf.select(config, "hydra.run.dir")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_unwritable(str(OmegaConf.select(config, "hydra.sweep.dir")))
        self.jobs = expand_jobs(config)
        if self.jobs is None:
            return
        invalid = [job for job in self.jobs if job.error is not None]
        if invalid:
            for job in invalid:
                print(f"mbn-train: invalid config in job {_swept_values(job, self.jobs)}: {job.error}", file=sys.stderr, flush=True)
            print(f"mbn-train: sweep not started: {len(invalid)} of {len(self.jobs)} jobs have an invalid config",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["config_error"])
        if config.get("dry_run", False) is True:
            counts: dict[str, int] = {}
            for job in self.jobs:
                print(format_plan(job.output_dir, job.plan), flush=True)
                counts[job.plan.action] = counts.get(job.plan.action, 0) + 1
            listing = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
            print(f"mbn-train: dry run of {len(self.jobs)} jobs: {listing}; nothing was run", flush=True)
            _last.append(SweepSummary([("dry_run", job.output_dir, None) for job in self.jobs]))
            raise SystemExit(0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.jobs is None:
            return
        summary = SweepSummary([_final_status(job) for job in self.jobs])
        for line in summary.lines():
            print(line, flush=True)
        _last.append(summary)


def _final_status(job: SweepJob) -> tuple[str, Path, str | None]:
    assert job.output_dir is not None and job.plan is not None
    if job.plan.action == "skip":
        if job.plan.previous_status is None:  # held by another process when the sweep started
            return "busy", job.output_dir, job.plan.reason
        return ("skipped" if job.plan.previous_status == "completed" else job.plan.previous_status), job.output_dir, job.plan.reason
    try:
        results = read_results(job.output_dir)
    except (OSError, ValueError) as exc:
        return "failed", job.output_dir, f"no readable results.json ({type(exc).__name__})"
    if results.get("config_hash") != job.config_hash:
        return "failed", job.output_dir, "results.json is from another config"
    status = results.get("status")
    if status == "running":
        return "failed", job.output_dir, "the job's process ended without a final status (killed?)"
    return status, job.output_dir, results.get("error")


def _swept_values(job: SweepJob, jobs: list[SweepJob]) -> str:
    """The overrides that tell ``job`` apart from the sweep's other jobs (all of them for a 1-job sweep)."""
    shared = set.intersection(*(set(other.overrides) for other in jobs)) if len(jobs) > 1 else set()
    return " ".join(o for o in job.overrides if o not in shared) or " ".join(job.overrides) or "(no overrides)"


def _exit_if_unwritable(directory: str) -> None:
    try:
        ensure_writable(directory)
    except ConfigError as exc:
        print(f"mbn-train: invalid config: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODES["config_error"]) from None
