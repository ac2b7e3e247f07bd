"""Sweep-level checks and reports of ``mbn-train -m``, for any Hydra launcher.

:class:`SweepCallback` (a Hydra callback, set in ``configs/train.yaml``) runs in the process that
launches the jobs, whichever launcher runs them (in-process, joblib workers, SLURM via submitit):

- before the first job starts, every job's config is composed, resolved and validated; one bad
  swept value stops the sweep before any training (exit 2), listing every bad job;
- with ``dry_run=true`` it lists what each job would do (start, resume, skip, replace) and stops;
- after the last job it prints one summary line (completed / failed / diverged / skipped counts)
  and the dirs of the jobs that did not complete, read from their ``results.json``; ``mbn-train``
  raises it as the exit code (a non-zero one), after which ``mbn-train`` returns it.

The job list is the one Hydra's basic sweeper builds (``hydra.sweeper.params`` then command-line
overrides); with another sweeper the callback does nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mbn.cli.config import ConfigError, check_buildable, composition_error
from mbn.cli.schema import Job, load_job, to_run_spec
from mbn.results import config_hash
from mbn.train.job import JobOutcome, job_outcome, plan_job, same_config_dirs
from mbn.train.run_dir import INVOCATION_ENV, JobPlan, verify_checkpoint
from mbn.train.spec import RunSpec

EXIT_CODES = {"completed": 0, "skipped": 0, "dry_run": 0, "busy": 0, "failed": 1, "config_error": 2, "diverged": 3, "interrupted": 130}
# The sweeper whose job list expand_jobs reproduces (the cartesian product of the swept values).
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
    """Final outcome of every job of a sweep, in launch order.

    Args:
        jobs: one :class:`~mbn.train.job.JobOutcome` per job.
    """

    jobs: list[JobOutcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Jobs per status (jobs another command ran are counted under ``<status> elsewhere``)."""
        counts: dict[str, int] = {}
        for outcome in self.jobs:
            label = _label(outcome)
            counts[label] = counts.get(label, 0) + 1
        return counts

    @property
    def exit_code(self) -> int:
        """0 when every job completed, was skipped as completed or runs elsewhere, else the worst status's code."""
        return max((EXIT_CODES.get(outcome.status, 1) for outcome in self.jobs), default=0)

    def lines(self) -> list[str]:
        """The summary line, then one line per job that did not complete."""
        order = ("completed", "failed", "diverged", "interrupted", "busy", "skipped")
        counts = self.counts()
        labels = [*order, *sorted(label for label in counts if label not in order)]
        parts = [f"{counts.get(label, 0)} {label}" for label in labels if label in counts or label in ("completed", "failed", "skipped")]
        lines = [f"mbn-train: sweep done: {', '.join(parts)} (of {len(self.jobs)} jobs)"]
        for outcome in self.jobs:
            if outcome.status not in ("completed", "skipped"):
                lines.append(f"mbn-train:   {_label(outcome)}: {outcome.output_dir}" + (f" - {outcome.error}" if outcome.error else ""))
        return lines


def _label(outcome: JobOutcome) -> str:
    if outcome.status == "busy":
        return "busy"
    return f"{outcome.status} elsewhere" if outcome.elsewhere else outcome.status


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


def sweep_overrides(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in launch order, as Hydra's basic sweeper builds them.

    ``hydra.sweeper.params`` then the command line; a comma list (or ``range``/``choice``) is swept,
    and the jobs are the cartesian product in that order. None with another sweeper (its job list
    is its own).

    Args:
        config: the multirun's master config (with its ``hydra`` node).
    """
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.to_container(config.hydra.sweeper.params) if config.hydra.sweeper.get("params") else {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    # One entry per key, in first-seen order; a later override of the same key wins (as in Hydra).
    values: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
    lists = list(values.values())
    return [list(job) for job in itertools.product(*lists)]


def expand_jobs(config: DictConfig) -> list[SweepJob] | None:
    """Every job of the multirun ``config`` with its dir, config hash and plan, or its config error.

    Returns None when the sweep does not use Hydra's basic sweeper (the job list is then unknown).

    Args:
        config: the multirun's master config (with its ``hydra`` node).
    """
    job_overrides = sweep_overrides(config)
    if job_overrides is None:
        return None
    loader = GlobalHydra.instance().config_loader()
    hydra_config = HydraConfig.instance().cfg
    built: dict[str, ConfigError | None] = {}
    jobs = []
    try:
        for overrides in job_overrides:
            jobs.append(_plan_one(loader, config, overrides, built))
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
        try:
            job_config = loader.load_sweep_config(config, overrides)
        except Exception as exc:  # noqa: BLE001 - Hydra composition errors (e.g. an unknown group option)
            raise composition_error(exc) from None
        job.output_dir = Path(str(OmegaConf.select(job_config, "hydra.sweep.dir"))) / str(
            OmegaConf.select(job_config, "hydra.sweep.subdir")
        )
        HydraConfig.instance().set_config(job_config)
        task = load_job(_task_node(job_config))
        digest = config_hash(task.config)
        spec = to_run_spec(task, job.output_dir, overrides, digest)
        _check_buildable_once(spec, built)
    except ConfigError as exc:
        job.error = str(exc)
        return job
    job.config_hash = digest
    job.plan = plan_job(job.output_dir, digest, task.rerun_diverged, search=same_config_dirs(spec))
    return job


def _task_node(job_config: DictConfig) -> DictConfig:
    """A job's composed config without its ``hydra`` node, keeping the schema types."""
    task_config = job_config.copy()
    with read_write(task_config), open_dict(task_config):
        del task_config["hydra"]
    return task_config


def _check_buildable_once(spec: Any, built: dict[str, ConfigError | None]) -> None:
    """Build each distinct (model, norm) once, as the job would, to catch bad layer options up front."""
    key = repr((spec.model, spec.norm, spec.data.batch_size == 1 and spec.data.source))
    if key not in built:
        try:
            check_buildable(spec)
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
        if invalid and len(invalid) == len(self.jobs) and len({job.error for job in invalid}) == 1:
            # The same error in every job (a bad sweep_name, output root or shared value): one line.
            print(f"mbn-train: invalid config: {invalid[0].error} (all {len(invalid)} jobs; sweep not started)",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["config_error"])
        if invalid:
            for job in invalid:
                print(f"mbn-train: invalid config in job {_swept_values(job, self.jobs)}: {job.error}", file=sys.stderr, flush=True)
            print(f"mbn-train: sweep not started: {len(invalid)} of {len(self.jobs)} jobs have an invalid config",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["config_error"])
        stack = int(config.get("stack", 1) or 1)
        packs = seed_packs(self.jobs, stack) if stack > 1 else []
        if config.get("dry_run", False) is True:
            counts: dict[str, int] = {}
            for job in self.jobs:
                plan = verify_checkpoint(job.plan, job.output_dir, job.config_hash)
                print(plan.line(job.output_dir), flush=True)
                counts[plan.action] = counts.get(plan.action, 0) + 1
            for pack in packs:
                seeds = ", ".join(str(_seed_of(job)) for job in pack)
                print(f"mbn-train: would stack seeds {seeds} in one process (with {pack[0].output_dir})", flush=True)
            listing = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
            stacked = f" in {len(packs)} stacked pack{'s' if len(packs) > 1 else ''}" if packs else ""
            print(f"mbn-train: dry run of {len(self.jobs)} jobs{stacked}: {listing}; nothing was run", flush=True)
            raise SystemExit(0)
        if packs:
            _launch_one_job_per_pack(config, _sweep_seeds(self.jobs), stack)
        _tag_jobs_with_invocation(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.jobs is None:
            return
        invocation = os.environ.get(INVOCATION_ENV)
        summary = SweepSummary([job_outcome(job.output_dir, job.config_hash, job.plan, invocation) for job in self.jobs])
        for line in summary.lines():
            print(line, flush=True)
        if summary.exit_code:
            raise SystemExit(summary.exit_code)


def _seed_of(job: SweepJob) -> int | None:
    values = [o.partition("=")[2] for o in job.overrides if o.lstrip("+").partition("=")[0] == "seed"]
    return int(values[-1]) if values else None


def _sweep_seeds(jobs: list[SweepJob]) -> list[int]:
    """The sweep's seeds in launch order (each once)."""
    return list(dict.fromkeys(seed for seed in map(_seed_of, jobs) if seed is not None))


def seed_packs(jobs: list[SweepJob], stack: int) -> list[list[SweepJob]]:
    """Jobs that differ only in ``seed``, in packs of up to ``stack`` (in launch order).

    Jobs that differ in anything else are never packed together: a pack shares every other override.
    Packs of one job are left out (they run as today).

    Args:
        jobs: the sweep's jobs (:func:`expand_jobs`).
        stack: the most jobs one pack holds.
    """
    seeds = _sweep_seeds(jobs)
    groups: dict[tuple[str, ...], list[SweepJob]] = {}
    for job in jobs:
        if _seed_of(job) is None:
            continue
        others = tuple(o for o in job.overrides if o.lstrip("+").partition("=")[0] != "seed")
        groups.setdefault(others, []).append(job)
    packs = []
    for members in groups.values():
        members.sort(key=lambda job: seeds.index(_seed_of(job)))
        for start in range(0, len(seeds), stack):
            chunk = [job for job in members if seeds.index(_seed_of(job)) // stack == start // stack]
            if len(chunk) > 1:
                packs.append(chunk)
    return packs


def _launch_one_job_per_pack(config: DictConfig, seeds: list[int], stack: int) -> None:
    """Have the launcher run one job per pack: the seed sweep becomes a sweep over each pack's first seed.

    Every launched job gets the sweep's seeds (``stack_seeds``) and trains its chunk of them
    (:meth:`mbn.cli.schema.TrainConfig.pack_seeds`). Hydra reads the sweep's parameters and
    overrides after ``on_multirun_start``, so any launcher (basic, joblib, SLURM) sees the packs.
    """
    leaders = ",".join(str(seed) for seed in seeds[::stack])
    with read_write(config.hydra), open_dict(config.hydra):
        params = config.hydra.sweeper.get("params")
        if params is not None and "seed" in params:
            del params["seed"]
        task = [o for o in config.hydra.overrides.task if o.lstrip("+").partition("=")[0] != "seed"]
        config.hydra.overrides.task = [*task, f"seed={leaders}", f"stack_seeds=[{','.join(map(str, seeds))}]"]


def _tag_jobs_with_invocation(config: DictConfig) -> None:
    """Have every job of this command record its invocation id, in whatever process a launcher runs it.

    Jobs are composed again from ``hydra.overrides.hydra`` (in the launching process, a joblib
    worker or a SLURM task), so the id travels as Hydra's ``hydra.job.env_set`` for the job.
    """
    invocation = os.environ.setdefault(INVOCATION_ENV, uuid.uuid4().hex[:12])
    with read_write(config.hydra):
        # Quoted: an unquoted hex id such as 12e4... would be parsed as a number.
        config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{INVOCATION_ENV}='{invocation}'")
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


def member_spec(job: Job, leader: RunSpec, seed: int) -> RunSpec:
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
