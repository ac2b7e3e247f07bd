"""Sweep-level checks and reports of ``mbn-train -m``, for any Hydra launcher.

:class:`SweepCallback` (a Hydra callback, set in ``configs/train.yaml``) runs in the process that
launches the jobs, whichever launcher runs them (in-process, joblib workers, SLURM via submitit):

- before the first job starts, every job's config is composed, resolved and validated; one bad
  swept value stops the sweep before any training (exit 2), listing every bad job;
- with ``dry_run=true`` it lists what each job would do (start, resume, skip, replace) and stops;
- after the last job it prints one summary line (completed / failed / diverged / skipped counts)
  and the dirs of the jobs that did not complete, read from their ``results.json``; ``mbn-train``
  raises it as the exit code (a non-zero one), after which ``mbn-train`` returns it.

With Hydra's basic sweeper the job list is known before launch (``hydra.sweeper.params`` then
command-line overrides), so every job is checked and planned up front. Another sweeper (Optuna,
``hydra/sweeper=optuna``) proposes its jobs as it runs: the values every job shares are checked up
front, each job writes its outcome and objective to this command's ledger in the sweep dir
(:func:`record_job`), and the summary reads the ledger, names the best job, and counts a job whose
process died without an entry from its ``results.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mbn.cli.config import CIFAR_IMAGE_SIZE, ConfigError, check_buildable, composition_error
from mbn.cli.schema import PACK_KEYS, STACK_AUTO, Job, load_job, to_run_spec
from mbn.models.stack_probe import StackProbe, choose_stack_size, probe_stack
from mbn.results import config_hash, iter_results, read_results
from mbn.train.job import JobOutcome, job_outcome, plan_job, same_config_dirs
from mbn.train.run_dir import INVOCATION_ENV, JobPlan, verify_checkpoint
from mbn.train.spec import RunSpec
from mbn.utils.io import atomic_write_json

# The pid of the mbn-train command's own process: a job that ran in it (Hydra's basic launcher, or
# joblib with one job at a time, which runs jobs in the calling process) and was interrupted stops the sweep.
SWEEP_PROCESS_ENV = "MBN_SWEEP_PROCESS"
EXIT_CODES = {"completed": 0, "skipped": 0, "dry_run": 0, "busy": 0, "failed": 1, "config_error": 2, "diverged": 3, "interrupted": 130}
# The option of Hydra's ``hydra/sweeper`` group whose job list expand_jobs reproduces (the cartesian
# product of the swept values); read from ``hydra.runtime.choices``, Hydra's public record of the
# options a config was composed from.
BASIC_SWEEPER = "basic"
# Set (through ``hydra.job.env_set``) for the jobs of a sweep whose job list is not known up front:
# the name of the dir in the sweep dir where each job writes its outcome for the summary (record_job).
LEDGER_ENV = "MBN_SWEEP_LEDGER"


@dataclass
class SweepJob:
    """One job of a sweep as planned before launch.

    Args:
        overrides: the job's overrides.
        output_dir: its dir.
        config_hash: hash of its resolved config (None when invalid).
        plan: what it will do (None when invalid).
        error: why its config is invalid (None when valid).
        spec: its run (None when invalid).
    """

    overrides: list[str]
    output_dir: Path | None = None
    config_hash: str | None = None
    plan: JobPlan | None = None
    error: str | None = None
    spec: RunSpec | None = None


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


def sweeper_option(config: DictConfig) -> str | None:
    """The chosen option of the ``hydra/sweeper`` group (``basic`` unless a command or config picks another).

    Args:
        config: the multirun's master config (with its ``hydra`` node).
    """
    choices = OmegaConf.select(config, "hydra.runtime.choices")
    return None if choices is None else choices.get("hydra/sweeper")


def sweep_overrides(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in launch order, as Hydra's basic sweeper builds them.

    ``hydra.sweeper.params`` then the command line; a comma list (or ``range``/``choice``) is swept,
    and the jobs are the cartesian product in that order. None with another sweeper (its job list
    is its own).

    Args:
        config: the multirun's master config (with its ``hydra`` node).
    """
    if sweeper_option(config) != BASIC_SWEEPER:
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
    built: dict[str, ConfigError | None] = {}
    jobs = [_plan_one(config, overrides, built) for overrides in job_overrides]
    first_job_of_dir: dict[Path, SweepJob] = {}
    for job in jobs:
        if job.output_dir is None or job.error is not None:
            continue
        other = first_job_of_dir.setdefault(job.output_dir, job)
        if other is not job:
            # Overrides of keys left out of dir names (output location, loggers, control keys) cannot be swept.
            job.error = f"same dir as job {' '.join(other.overrides)} ({job.output_dir}): sweep only keys that name the job's dir"
    return jobs


def _plan_one(config: DictConfig, overrides: list[str], built: dict[str, ConfigError | None]) -> SweepJob:
    job = SweepJob(overrides)
    try:
        try:
            # What Hydra's launchers compose for a job: the master config's Hydra overrides, then the
            # job's (Hydra's public Compose API, which works inside a running @hydra.main app).
            job_config = compose(config_name=config.hydra.job.config_name, return_hydra_config=True,
                                 overrides=[*config.hydra.overrides.hydra, *overrides])
        except Exception as exc:  # noqa: BLE001 - Hydra composition errors (e.g. an unknown group option)
            raise composition_error(exc) from None
        job.output_dir = Path(str(OmegaConf.select(job_config, "hydra.sweep.dir"))) / str(
            OmegaConf.select(job_config, "hydra.sweep.subdir")
        )
        task = load_job(_task_node(job_config))
        digest = config_hash(task.config)
        spec = to_run_spec(task, job.output_dir, overrides, digest)
        _check_buildable_once(spec, built)
    except ConfigError as exc:
        job.error = str(exc)
        return job
    job.config_hash = digest
    job.spec = spec
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

    # The ledger sweep of this process between its start and its summary: mbn-train summarizes it
    # when the sweeper raises instead of returning (summarize_after_sweeper_error).
    unfinished: "SweepCallback | None" = None

    def __init__(self) -> None:
        self.jobs: list[SweepJob] | None = None
        self.ledger: Path | None = None
        self.objective = ""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCallback.unfinished = None  # (a sweep stopped by SystemExit in this process is over)
        _exit_if_unwritable(str(OmegaConf.select(config, "hydra.run.dir")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(OmegaConf.select(config, "hydra.sweep.dir"))
        _exit_if_unwritable(sweep_dir)
        SweepCallback.unfinished = None
        self.jobs = expand_jobs(config)
        self.ledger = None
        if self.jobs is None:
            self._start_unplanned(config, Path(sweep_dir))
            return
        invalid = [job for job in self.jobs if job.error is not None]
        if invalid and len(invalid) == len(self.jobs) and len({job.error for job in invalid}) == 1:
            # The same error in every job (a bad sweep_name, output root or shared value): one line.
            print(f"mbn-train: invalid config: {invalid[0].error} (all {len(invalid)} jobs; sweep not started)",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["config_error"])
        if invalid:
            for job in invalid:
                print(f"mbn-train: invalid config in job {_swept_values(job.overrides, [other.overrides for other in self.jobs])}: "
                      f"{job.error}", file=sys.stderr, flush=True)
            print(f"mbn-train: sweep not started: {len(invalid)} of {len(self.jobs)} jobs have an invalid config",
                  file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["config_error"])
        stack = config.get("stack", 1)
        key = pack_key(self.jobs) if stack != 1 else None
        shape_stacks: dict[str, int] = {}
        if stack == STACK_AUTO:
            stack, shape_stacks, lines = auto_stack(self.jobs, key) if key is not None else (1, {}, [])
            for line in lines:
                print(line, flush=True)
        packs = stacked_packs(self.jobs, key, stack) if key is not None and stack > 1 else []
        if config.get("dry_run", False) is True:
            counts: dict[str, int] = {}
            for job in self.jobs:
                plan = verify_checkpoint(job.plan, job.output_dir, job.config_hash)
                print(plan.line(job.output_dir), flush=True)
                counts[plan.action] = counts.get(plan.action, 0) + 1
            for pack in packs:
                stacks = split_pack([str(_value_of(job, key)) for job in pack], shape_stacks.get(_stack_shape(pack[0].spec), len(pack)))
                if len(stacks) == 1:
                    print(f"mbn-train: would stack {_plural(key)} {', '.join(stacks[0])} in one process (with {pack[0].output_dir})", flush=True)
                else:
                    listing = " then ".join(", ".join(values) for values in stacks)
                    print(f"mbn-train: would train {_plural(key)} {listing} in one process, one stack after another "
                          f"(with {pack[0].output_dir})", flush=True)
            listing = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
            stacked = f" in {len(packs)} stacked pack{'s' if len(packs) > 1 else ''}" if packs else ""
            print(f"mbn-train: dry run of {len(self.jobs)} jobs{stacked}: {listing}; nothing was run", flush=True)
            raise SystemExit(0)
        if packs:
            _launch_one_job_per_pack(config, key, _sweep_values(self.jobs, key), stack)
        _tag_jobs_with_invocation(config)

    def _start_unplanned(self, config: DictConfig, sweep_dir: Path) -> None:
        """A sweeper that proposes its jobs as it runs: check the shared values, open this command's ledger."""
        option = sweeper_option(config)
        try:
            check_shared_values(config, sweep_dir)
            tune_settings(config)
        except ConfigError as exc:
            print(f"mbn-train: invalid config: {exc} (every job; sweep not started)", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODES["config_error"]) from None
        if config.get("dry_run", False) is True:
            # The jobs' values are proposed as the jobs run (from the results so far): none to list.
            trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
            print(f"mbn-train: would start the jobs hydra/sweeper={option} proposes"
                  f"{f' ({trials} trials)' if trials is not None else ''} in {sweep_dir}, each planned, run and "
                  "recorded as it starts; the values every job shares are valid; nothing was run", flush=True)
            raise SystemExit(0)
        # Optuna imports alembic, whose plugin registry logs each of its plugins at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        stack = config.get("stack", 1)
        if stack != 1:
            print(f"mbn-train: stack={stack} packs the seeds of a basic sweep only; with hydra/sweeper={option} "
                  "every job trains alone", flush=True)
        invocation = _tag_jobs_with_invocation(config)
        name = f".mbn-sweep-{invocation}"
        self.ledger = sweep_dir / name
        self.objective = str(config.objective)
        _set_job_env(config, LEDGER_ENV, name)
        SweepCallback.unfinished = self

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        invocation = os.environ.get(INVOCATION_ENV)
        if self.jobs is not None:
            summary = SweepSummary([job_outcome(job.output_dir, job.config_hash, job.plan, invocation) for job in self.jobs])
            for line in summary.lines():
                print(line, flush=True)
            code = summary.exit_code
        elif self.ledger is not None:
            code = self.summarize_ledger()
        else:
            return
        if code:
            raise SystemExit(code)

    def summarize_ledger(self) -> int:
        """Print the summary of a sweep whose jobs wrote a ledger and name its best job; remove the ledger.

        Returns:
            The sweep's exit code.
        """
        assert self.ledger is not None
        SweepCallback.unfinished = None
        entries = read_ledger(self.ledger)
        recorded = {Path(entry.outcome.output_dir).resolve() for entry in entries}
        summary = SweepSummary([entry.outcome for entry in entries]
                               + unrecorded_outcomes(self.ledger.parent, os.environ.get(INVOCATION_ENV), recorded))
        for line in [*summary.lines(), best_job_line(entries, self.objective, objective_direction(self.objective))]:
            print(line, flush=True)
        shutil.rmtree(self.ledger, ignore_errors=True)
        return summary.exit_code


def summarize_after_sweeper_error(exc: BaseException) -> int | None:
    """When the sweeper raised after its jobs ran (Optuna's, when no trial completed, has no best
    trial to report), print the sweep's summary all the same.

    Args:
        exc: what the sweeper raised.

    Returns:
        The exit code (at least 1); None when no sweep with a ledger is open in this process.
    """
    callback, SweepCallback.unfinished = SweepCallback.unfinished, None
    if callback is None:
        return None
    print(f"mbn-train: the sweeper stopped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
          file=sys.stderr, flush=True)
    return max(callback.summarize_ledger(), EXIT_CODES["failed"])


def objective_direction(metric: str) -> str:
    """How a tuning sweeper ranks a metric of ``results.json``: ``minimize`` a loss, ``maximize`` an accuracy.

    Args:
        metric: the sweep's ``objective``.
    """
    return "minimize" if metric.endswith("_loss") else "maximize"


def tune_settings(config: DictConfig) -> None:
    """Set what mbn-train decides in a tuning sweeper's config (the keys of Hydra's Optuna sweeper,
    where it has them), before Hydra instantiates the sweeper from it:

    - ``hydra.sweeper.direction`` follows ``objective`` (:func:`objective_direction`); Optuna's own
      default, minimize, would search for the worst accuracy;
    - an unset ``hydra.sweeper.sampler.seed`` becomes 0, so the same command proposes the same
      trials and a rerun skips those that completed.

    Args:
        config: the multirun's master config (with its ``hydra`` node).

    Raises:
        ConfigError: the command sets a direction that contradicts the objective.
    """
    objective = str(config.get("objective"))
    if objective.split("_")[1:2] == ["val"] and OmegaConf.select(config, "data.val_subset") is None:
        raise ConfigError("objective", f"{objective} is measured on the validation split, which this sweep does not hold "
                          "out: set data.val_subset=N (N training images; tuning on the test split would bias the "
                          "result it reports), or tune another objective")
    sweeper = config.hydra.sweeper
    with read_write(sweeper), open_dict(sweeper):
        if "direction" in sweeper:
            wanted = objective_direction(objective)
            given = [o.partition("=")[2] for o in config.hydra.overrides.hydra
                     if o.partition("=")[0].lstrip("+") == "hydra.sweeper.direction"]
            if given and given[-1] != wanted:
                raise ConfigError("hydra.sweeper.direction", f"{given[-1]} contradicts objective={objective}, which is "
                                  f"{wanted}d; leave the direction out (it follows the objective) or set another objective")
            sweeper.direction = wanted
        if "sampler" in sweeper and "seed" in sweeper.sampler and sweeper.sampler.seed is None:
            sweeper.sampler.seed = 0


def check_shared_values(config: DictConfig, sweep_dir: Path) -> None:
    """Check what every job of a sweep shares, before any starts: the master config (Hydra leaves the
    swept keys at their defaults in it), as one job of the sweep would be checked.

    Args:
        config: the multirun's master config (with its ``hydra`` node).
        sweep_dir: the sweep's dir.

    Raises:
        ConfigError: the first bad value.
    """
    task = load_job(_task_node(config))
    spec = to_run_spec(task, sweep_dir / "shared", [], config_hash(task.config))
    check_buildable(spec)


@dataclass
class LedgerEntry:
    """One job's line in a sweep's ledger: how it ended and its objective.

    Args:
        outcome: the job's outcome.
        overrides: the job's overrides.
        value: its objective (None when it has none: the job did not complete).
    """

    outcome: JobOutcome
    overrides: list[str]
    value: float | None


def objective_value(outcome: JobOutcome | None, objective: str) -> float | None:
    """A job's objective for the sweeper: the metric in its run's ``results.json`` when that run
    completed (in this command or before: a skipped job's value is its run's), else None.

    Hydra's Optuna sweeper (1.3) records a None as a failed trial ("Return value must be
    float-castable") and goes on; a NaN would break it (it then tells Optuna the failed trial's NaN,
    which Optuna refuses), and a raised exception would stop Hydra's basic sweeper. The basic sweeper
    ignores the value.

    Args:
        outcome: the job's outcome (None for a dry run).
        objective: a metric name of ``results.json``'s ``metrics``.
    """
    if outcome is None:
        return None
    try:
        record = read_results(outcome.output_dir)
    except (OSError, ValueError):
        return None
    value = (record.get("metrics") or {}).get(objective)
    if record.get("status") != "completed" or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def record_job(outcome: JobOutcome, value: float | None) -> None:
    """Write a job's outcome and objective to its sweep's ledger (when the sweep keeps one: see
    :data:`LEDGER_ENV`), from whatever process the launcher runs the job in.

    Args:
        outcome: the job's outcome.
        value: its objective (:func:`objective_value`).
    """
    name = os.environ.get(LEDGER_ENV)
    if not name:
        return
    hydra_cfg = HydraConfig.get()
    entry = {**dataclasses.asdict(outcome), "output_dir": str(outcome.output_dir),
             "overrides": list(hydra_cfg.overrides.task), "value": value}
    atomic_write_json(Path(str(hydra_cfg.sweep.dir)) / name / f"{hydra_cfg.job.num}.json", entry)


def end_job(outcome: JobOutcome | None, objective: str, deciding_rank: bool) -> float | None:
    """A sweep job's end: stop the sweep when the job was interrupted in this process, record its
    outcome (from the rank that decides), and return its objective to the sweeper.

    Args:
        outcome: the job's outcome (None for a dry run).
        objective: the metric the sweeper optimizes (``objective``).
        deciding_rank: this process decides for the job (rank 0, or no cluster launcher).

    Raises:
        SystemExit: the job was interrupted in the sweep's own process (the basic launcher, or joblib
            running one job at a time): the user (or the scheduler) asked to stop. (Other launchers
            run jobs in other processes and stop on their own; the summary reports it.)
    """
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    in_sweep_process = os.environ.get(SWEEP_PROCESS_ENV) == str(os.getpid())
    if outcome is not None and outcome.status == "interrupted" and ("BasicLauncher" in launcher or in_sweep_process):
        raise SystemExit(EXIT_CODES["interrupted"])
    value = objective_value(outcome, objective)
    if outcome is not None and deciding_rank:
        record_job(outcome, value)
    return value


def read_ledger(ledger: Path) -> list[LedgerEntry]:
    """The entries of a sweep's ledger, in launch order (empty when no job wrote one)."""
    paths = sorted(ledger.glob("*.json"), key=lambda path: int(path.stem)) if ledger.is_dir() else []
    entries = []
    for path in paths:
        data = json.loads(path.read_text())
        outcome = JobOutcome(data["status"], Path(data["output_dir"]), data.get("error"), bool(data.get("elsewhere")))
        entries.append(LedgerEntry(outcome, list(data["overrides"]), data.get("value")))
    return entries


def unrecorded_outcomes(sweep_dir: Path, invocation: str | None, recorded: set[Path]) -> list[JobOutcome]:
    """Runs of the sweep dir that this command attempted but whose job wrote no ledger entry (its
    process died): read from their ``results.json``.

    Args:
        sweep_dir: the sweep's dir.
        invocation: this command's :data:`INVOCATION_ENV`.
        recorded: the run dirs the ledger names (resolved).
    """
    outcomes = []
    for path in iter_results(sweep_dir) if invocation and sweep_dir.is_dir() else ():
        if path.parent.resolve() in recorded:
            continue
        try:
            record = read_results(path)
        except (OSError, ValueError):
            continue
        attempts = record.get("attempts") or []
        if not attempts or attempts[-1].get("invocation") != invocation:
            continue
        if record.get("status") == "running":
            outcomes.append(JobOutcome("failed", path.parent, "the job's process ended without a final status (killed?)"))
        else:
            outcomes.append(JobOutcome(str(record.get("status")), path.parent))
    return outcomes


def best_job_line(entries: list[LedgerEntry], objective: str, direction: str) -> str:
    """The line naming the sweep's best job by ``objective`` (``minimize`` or ``maximize``), with the
    values that tell it apart from the other jobs."""
    scored = [entry for entry in entries if entry.value is not None]
    if not scored:
        return f"mbn-train: best job: none (no job completed with a {objective})"
    pick = min if direction == "minimize" else max
    best = pick(scored, key=lambda entry: entry.value)
    values = _swept_values(best.overrides, [entry.overrides for entry in entries]) if len(entries) > 1 else ""
    return (f"mbn-train: best job: {objective} {best.value:.4f} ({direction}d over {len(scored)} of {len(entries)} jobs)"
            f"{': ' + values if values else ''} in {best.outcome.output_dir}")


def _value_of(job: SweepJob, key: str) -> str | None:
    values = [o.partition("=")[2] for o in job.overrides if o.lstrip("+").partition("=")[0] == key]
    return values[-1] if values else None


def _plural(key: str) -> str:
    return "seeds" if key == "seed" else f"{key} values"


def _sweep_values(jobs: list[SweepJob], key: str) -> list[str]:
    """The sweep's values of ``key`` in launch order (each once)."""
    return list(dict.fromkeys(value for job in jobs if (value := _value_of(job, key)) is not None))


def pack_key(jobs: list[SweepJob]) -> str | None:
    """The key a stacked sweep packs along: the first of :data:`~mbn.cli.schema.PACK_KEYS` with several values; None if none has."""
    return next((key for key in PACK_KEYS if len(_sweep_values(jobs, key)) > 1), None)


def stacked_packs(jobs: list[SweepJob], key: str, stack: int) -> list[list[SweepJob]]:
    """Jobs that differ only in ``key``, in packs of up to ``stack`` (in launch order).

    Jobs that differ in anything else are never packed together: a pack shares every other override.
    Packs of one job are left out (they run as today).

    Args:
        jobs: the sweep's jobs (:func:`expand_jobs`).
        key: the key to pack along (:func:`pack_key`).
        stack: the most jobs one pack holds.
    """
    return [chunk for group in _pack_groups(jobs, key) for chunk in _chunks(group, key, _sweep_values(jobs, key), stack) if len(chunk) > 1]


def _pack_groups(jobs: list[SweepJob], key: str) -> list[list[SweepJob]]:
    """The jobs that share every override but ``key``, group by group, each in the order of ``key``'s values."""
    values = _sweep_values(jobs, key)
    groups: dict[tuple[str, ...], list[SweepJob]] = {}
    for job in jobs:
        if _value_of(job, key) is None:
            continue
        others = tuple(o for o in job.overrides if o.lstrip("+").partition("=")[0] != key)
        groups.setdefault(others, []).append(job)
    for members in groups.values():
        members.sort(key=lambda job: values.index(_value_of(job, key)))
    return list(groups.values())


def _chunks(group: list[SweepJob], key: str, values: list[str], stack: int) -> list[list[SweepJob]]:
    """A group's jobs as the launcher packs them at ``stack``: by the chunk of the sweep's values each value falls in."""
    chunks: dict[int, list[SweepJob]] = {}
    for job in group:
        chunks.setdefault(values.index(_value_of(job, key)) // stack, []).append(job)
    return list(chunks.values())


def probe_for(spec: RunSpec, num_members: int) -> StackProbe:
    """:func:`~mbn.models.stack_probe.probe_stack` for ``spec``'s model, norm, batch size and device (cached).

    The planner and the stacked job ask with the same arguments, so the job reads the planner's probe.

    Args:
        spec: a run of the pack.
        num_members: K.
    """
    source = spec.data.source
    size = getattr(source, "image_size", CIFAR_IMAGE_SIZE)
    accelerator = spec.trainer.accelerator
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return probe_stack(
        spec.model.name, width=spec.model.width, norm=spec.norm.name, batch_size=spec.data.batch_size,
        num_members=num_members, norm_options=spec.norm_options(steps_per_epoch=1), model_options=spec.model.options,
        image_shape=(getattr(source, "channels", 3), size, size), num_classes=getattr(source, "num_classes", 10),
        device="cuda" if cuda else "cpu", num_threads=spec.trainer.num_threads, cache_dir=spec.cache_dir,
    )  # fmt: skip


def _stack_shape(spec: RunSpec) -> str:
    return f"{spec.model.name} width {spec.model.width}, {spec.norm.name}, m={spec.data.batch_size}"


def group_stack_size(spec: RunSpec, count: int) -> tuple[int, dict[int, float], dict[int, StackProbe]]:
    """The K that trains ``count`` jobs of ``spec``'s shape fastest in one process: :func:`~mbn.models.stack_probe.choose_stack_size`
    over :func:`probe_for`.

    Args:
        spec: a run of the group.
        count: the group's jobs (the swept values of the pack key).

    Returns:
        The K, each candidate's projected speed against unstacked, and the probes by K.
    """
    return choose_stack_size(count, lambda members: probe_for(spec, members))


def split_pack(values: list[str], size: int) -> list[list[str]]:
    """A launched pack's values as the stacks its process trains one after another, ``size`` members each."""
    return [values[start : start + size] for start in range(0, len(values), size)]


def auto_stack(jobs: list[SweepJob], key: str) -> tuple[int, dict[str, int], list[str]]:
    """``stack=auto``: per pack shape, the K of :func:`group_stack_size`; the launcher packs at the largest.

    The launcher chunks every group of jobs (the jobs that share every other override) alike
    (:func:`_launch_one_job_per_pack`), so it launches one job per chunk of the largest K that any
    shape chose; a job whose shape chose a smaller K trains its chunk as stacks of that K, one
    after another (:func:`split_pack`, in :func:`mbn.cli.launch.launch_job`).

    Args:
        jobs: the sweep's valid jobs.
        key: the key they pack along (:func:`pack_key`).

    Returns:
        The launcher's K, each shape's K (by :func:`_stack_shape`), and the lines that show the
        probes and the choices (printed; ``dry_run`` stops after them).
    """
    if any(job.spec is not None and job.spec.trainer.world_size > 1 for job in jobs):
        return 1, {}, ["mbn-train: stack=auto: stack=1 (stacked runs train on one device; this sweep trains on several)"]
    count = len(_sweep_values(jobs, key))
    chosen: dict[str, int] = {}
    lines = []
    for group in _pack_groups(jobs, key):
        shape = _stack_shape(group[0].spec)
        if shape in chosen or count < 2:
            continue
        chosen[shape], speeds, probes = group_stack_size(group[0].spec, count)
        for size, probe in sorted(probes.items()):
            if size > 1:
                lines.append(f"mbn-train: stack=auto probe of {shape}: {probe.summary()}")
        relative = ", ".join(f"K={size}: {speed:.2f}x" for size, speed in speeds.items())
        lines.append(f"mbn-train: stack=auto chose stack={chosen[shape]} for {shape} "
                     f"(projected speed of its {count} jobs against unstacked: {relative})")
    return max(chosen.values(), default=1), chosen, lines


def _launch_one_job_per_pack(config: DictConfig, key: str, values: list[str], stack: int) -> None:
    """Have the launcher run one job per pack: the sweep of ``key`` becomes a sweep over each pack's first value.

    Every launched job gets the sweep's values (``stack_values``, along ``stack_key``) and trains its
    chunk of them (:meth:`mbn.cli.schema.TrainConfig.pack_values`). Hydra reads the sweep's
    parameters and overrides after ``on_multirun_start``, so any launcher (basic, joblib, SLURM)
    sees the packs.
    """
    leaders = ",".join(values[::stack])
    with read_write(config.hydra), open_dict(config.hydra):
        params = config.hydra.sweeper.get("params")
        if params is not None and key in params:
            del params[key]
        replaced = (key, "stack", "stack_path") if config.get("stack") == STACK_AUTO else (key,)
        task = [o for o in config.hydra.overrides.task if o.lstrip("+").partition("=")[0] not in replaced]
        # stack=auto: the chosen K, and each job picks its convolutions' paths from the (cached) probe.
        chosen = [f"stack={stack}", "stack_path=auto"] if config.get("stack") == STACK_AUTO else []
        config.hydra.overrides.task = [*task, f"{key}={leaders}", f"stack_key={key}", f"stack_values=[{','.join(values)}]", *chosen]


def _tag_jobs_with_invocation(config: DictConfig) -> str:
    """Have every job of this command record its invocation id, in whatever process a launcher runs it.

    Returns:
        The id.
    """
    invocation = os.environ.setdefault(INVOCATION_ENV, uuid.uuid4().hex[:12])
    _set_job_env(config, INVOCATION_ENV, invocation)
    return invocation


def _set_job_env(config: DictConfig, name: str, value: str) -> None:
    """Set an environment variable for every job of the sweep, in whatever process a launcher runs it.

    Jobs are composed again from ``hydra.overrides.hydra`` (in the launching process, a joblib
    worker or a SLURM task), so the value travels as Hydra's ``hydra.job.env_set`` for the job.
    """
    with read_write(config.hydra):
        # Quoted: an unquoted hex id such as 12e4... would be parsed as a number.
        config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{name}='{value}'")


def _swept_values(overrides: list[str], every_job: list[list[str]]) -> str:
    """The overrides that tell a job apart from the sweep's other jobs (all of them for a 1-job sweep)."""
    shared = set.intersection(*(set(other) for other in every_job)) if len(every_job) > 1 else set()
    return " ".join(o for o in overrides if o not in shared) or " ".join(overrides) or "(no overrides)"


def _exit_if_unwritable(directory: str) -> None:
    try:
        ensure_writable(directory)
    except ConfigError as exc:
        print(f"mbn-train: invalid config: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODES["config_error"]) from None


def member_spec(job: Job, leader: RunSpec, key: str, value: str) -> RunSpec:
    """The run of one member of a stacked pack: the leader's run with another value of ``key``, in its dir.

    The dir is the one the unstacked sweep gives the job with this value: the config's own
    ``hydra.sweep.subdir`` rule applied to the member's overrides.

    Args:
        job: the leader's composed job.
        leader: the leader's run.
        key: the key the pack varies (one of :data:`~mbn.cli.schema.PACK_KEYS`).
        value: the member's value, as the sweep wrote it.
    """
    overrides = [o for o in leader.overrides if o.lstrip("+").partition("=")[0] not in (key, "stack_key", "stack_values")]
    overrides.append(f"{key}={value}")
    hydra_cfg = HydraConfig.get()
    subdir_rule = OmegaConf.to_container(hydra_cfg.sweep, resolve=False)["subdir"]
    subdir = OmegaConf.create({"hydra": {"overrides": {"task": overrides}, "sweep": {"subdir": subdir_rule}}}).hydra.sweep.subdir
    output_dir = Path(leader.output_dir).parent / str(subdir)
    if key == "seed":
        config, changes = {**job.config, "seed": int(value)}, {"seed": int(value)}
    else:  # optim.<field>: a float field of OptimSpec
        field_name = key.split(".", 1)[1]
        config = {**job.config, "optim": {**job.config["optim"], field_name: float(value)}}
        changes = {"optim": dataclasses.replace(leader.optim, **{field_name: float(value)})}
    return dataclasses.replace(leader, output_dir=output_dir, run_name=output_dir.name, config=config,
                               config_hash=config_hash(config), overrides=overrides, **changes)