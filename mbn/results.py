"""The ``results.json`` every run writes: its schema, writer and reader.

This file is the contract between training (which writes it), sweeps (which skip runs whose
``results.json`` says ``completed`` for the same ``config_hash``) and ``mbn-compare`` (which reads
it). Pure Python: no torch, Lightning or Hydra import.

Schema (``schema_version`` 2)::

    {
      "schema_version": 2,
      "status": "running" | "completed" | "failed" | "diverged" | "interrupted",
      "error": null | "ExceptionType: message" (plus "traceback" with the full text),
      "config_hash": "1f3a...",           # stable hash of the resolved config (see config_hash())
      "config": {...},                      # the resolved config, nested dicts
      "overrides": ["norm=mbn", ...],       # the command-line overrides of this job
      "output_dir": "/abs/path",
      "norm": "mbn", "model": "resnet18", "dataset": "cifar10_archive", "seed": 0,
      "batch_size": 2,                      # per-device (= normalization) batch size m
      "world_size": 1, "global_batch_size": 2,
      "epochs": 10,                         # planned epochs T
      "epochs_completed": 10,
      "metrics": {                          # fractions in [0, 1]; null when not measured
        "final_test_acc1": 0.81, "final_test_acc5": 0.99, "final_test_loss": 0.6,   # test split, last epoch
        "best_test_acc1": 0.82,             # max over epochs: chosen on the test split itself
        "final_val_acc1": 0.80, "final_val_acc5": 0.99, "final_val_loss": 0.62,    # validation split
        "best_val_acc1": 0.81,              #   (data.val_subset); null without one
        "best_epoch": 9,                    # the epoch best.ckpt holds: max val_acc1, else max test_acc1
        "best_epoch_test_acc1": 0.81,       # test_acc1 of best_epoch
        "final_train_loss": 0.3, "final_train_acc1": 0.9   # train_* = running mean over the last epoch
      },
      "history": [                          # one row per finished epoch
        {"epoch": 1, "train_loss": ..., "train_acc1": ..., "val_loss": ..., "val_acc1": ..., "val_acc5": ...,
         "test_loss": ..., "test_acc1": ..., "test_acc5": ..., "lr": ..., "lam": ... or null,
         "tau": ... or null, "time_s": ...}
      ],
      "attempts": [                         # one per start of this run dir (resumes add one)
        {"started_at": ..., "finished_at": ..., "status": ..., "resumed_from": null or ckpt path,
         "host": ..., "pid": ..., "num_threads": ..., "cuda_visible_devices": ...,
         "wall_time_s": ...}                #   seconds of that attempt, as of its last write
      ],
      "wall_time_s": 123.4,                 # seconds of this (the last) attempt; all of them: total_wall_time()
      "started_at": "2026-11-25T12:00:00+00:00", "finished_at": "...",
      "versions": {"mbn": "0.1.0", "torch": "...", "pytorch_lightning": "..."}
    }

Schema 1 (before validation splits) evaluated on the test split only and called it ``val``: its
``val_*`` history columns and ``final_val_*`` / ``best_val_acc1`` metrics are test-split numbers
(``final_test_acc1`` and ``best_test_acc1`` were copies), and ``best_epoch`` was picked on the test
split. :func:`upgrade_record` reads such a record in schema 2's names.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from mbn.train.spec import RunSpec

from mbn.utils.io import atomic_write, atomic_write_json, overwrite_in_place

SCHEMA_VERSION = 2
# The layouts upgrade_record reads (the older ones are translated to the current one).
READABLE_SCHEMA_VERSIONS = (1, 2)
RESULTS_FILENAME = "results.json"
# Held (flock) by the process running a run: a second command never trains the same dir at once, and a
# "running" record whose lock nobody holds belongs to a process that died.
LOCK_FILENAME = ".lock"
STATUSES = ("running", "completed", "failed", "diverged", "interrupted")

# Keys that change where or how a run executes but not what it computes; they are left out of
# the config hash so that moving a sweep or changing the launcher does not rerun finished work.
HASH_EXCLUDED_KEYS = ("output_root", "hydra", "logger", "paths", "sweep_name", "run_name")


# Keys added to the config after runs were recorded, at the value that computes what those runs
# computed: left out of the hash at that value, so a rerun of an earlier command still finds its runs.
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("data", "val_subset"): None,
    **{("norm", key): None for key in ("warmup_epochs", "r_max_ramp_epochs", "d_max_ramp_epochs")},
}


def config_hash(config: Mapping[str, Any], exclude: tuple[str, ...] = HASH_EXCLUDED_KEYS) -> str:
    """Stable short hash of a resolved config, ignoring top-level keys in ``exclude`` and the keys of
    :data:`HASH_NEUTRAL_DEFAULTS` at their neutral value.

    Args:
        config: resolved config as nested plain dicts/lists/scalars.
        exclude: top-level keys that do not affect what the run computes.

    Returns:
        16 hex characters.
    """
    kept: Mapping[str, Any] = {k: v for k, v in config.items() if k not in exclude}
    for path, neutral in HASH_NEUTRAL_DEFAULTS.items():
        kept = _without_neutral(kept, path, neutral)
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _without_neutral(config: Mapping[str, Any], path: tuple[str, ...], neutral: Any) -> Mapping[str, Any]:
    """``config`` without the key at ``path`` when it holds ``neutral`` (copied along the path; ``config`` is left as it is)."""
    head, *rest = path
    if head not in config:
        return config
    if not rest:
        return {k: v for k, v in config.items() if k != head} if config[head] == neutral else config
    child = config[head]
    return {**config, head: _without_neutral(child, tuple(rest), neutral)} if isinstance(child, Mapping) else config


METRIC_KEYS = ("final_test_acc1", "final_test_acc5", "final_test_loss", "best_test_acc1",
               "final_val_acc1", "final_val_acc5", "final_val_loss", "best_val_acc1", "best_epoch", "best_epoch_test_acc1",
               "final_train_loss", "final_train_acc1")
# The history columns of each evaluation split (``val`` = the held-out validation split, ``test`` = the test split).
EVAL_COLUMNS = ("loss", "acc1", "acc5")


@dataclass(frozen=True)
class RunRecord:
    """One ``results.json``, field by field (see the schema above); :mod:`mbn.train.job` writes it.

    ``to_dict`` gives the JSON object (``schema_version`` is added on write); ``from_dict`` reads
    one back, keeping keys this version does not know.
    """

    status: str
    config_hash: str
    config: dict[str, Any]
    overrides: list[str]
    output_dir: str
    run_name: str
    sweep_name: str
    norm: str
    model: str
    dataset: str
    seed: int
    batch_size: int
    world_size: int
    global_batch_size: int
    lr: float
    epochs: int
    started_at: str
    error: str | None = None
    traceback: str | None = None
    resumed_from: str | None = None
    finished_at: str | None = None
    epochs_completed: int = 0
    metrics: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(METRIC_KEYS))
    history: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_run(cls, spec: "RunSpec", started_at: str, resume_from: Path | None, versions: dict[str, str]) -> "RunRecord":
        """The record of a run that is starting (status ``running``)."""
        return cls(
            status="running",
            config_hash=spec.config_hash,
            config=spec.config,
            overrides=list(spec.overrides),
            output_dir=str(Path(spec.output_dir).resolve()),
            run_name=spec.run_name,
            sweep_name=spec.sweep_name,
            norm=spec.norm.name,
            model=spec.model.name,
            dataset=spec.data.name,
            seed=spec.seed,
            batch_size=spec.data.batch_size,
            world_size=spec.trainer.world_size,
            global_batch_size=spec.global_batch_size,
            lr=spec.optim.lr(spec.global_batch_size),
            epochs=spec.epochs,
            started_at=started_at,
            resumed_from=str(resume_from) if resume_from is not None else None,
            versions=dict(versions),
        )

    def updated(self, **changes: Any) -> "RunRecord":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (without ``schema_version``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if data["traceback"] is None:
            del data["traceback"]
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunRecord":
        """Read a record back (unknown keys are kept in ``extra`` and written again)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "schema_version"}
        return cls(**known, extra=extra)


def summarize_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``epochs_completed``, ``metrics`` and ``history`` (non-finite numbers as null) of a run's epochs.

    ``best_epoch`` is the epoch of the highest ``val_acc1`` when the rows have one (a validation
    split), else of the highest ``test_acc1``: the epoch ``best.ckpt`` holds.
    """
    metrics: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    if history:
        last = history[-1]
        for split in ("val", "test"):
            for column in EVAL_COLUMNS:
                metrics[f"final_{split}_{column}"] = last.get(f"{split}_{column}")
            best = _best_row(history, f"{split}_acc1")
            metrics[f"best_{split}_acc1"] = best[f"{split}_acc1"] if best else None
        selected = _best_row(history, "val_acc1") or _best_row(history, "test_acc1")
        metrics.update(
            best_epoch=selected["epoch"] if selected else None,
            best_epoch_test_acc1=selected.get("test_acc1") if selected else None,
            final_train_loss=last.get("train_loss"),
            final_train_acc1=last.get("train_acc1"),
        )
    return {"epochs_completed": len(history), "metrics": metrics, "history": [_finite(row) for row in history]}


def _best_row(history: list[dict[str, Any]], column: str) -> dict[str, Any] | None:
    """The first row with the highest number in ``column`` (None when no row has one)."""
    scored = [row for row in history if isinstance(row.get(column), (int, float)) and math.isfinite(row[column])]
    return max(scored, key=lambda row: row[column]) if scored else None


def upgrade_record(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``results.json`` object in the current schema's names (``schema_version`` is kept as recorded).

    A schema 1 record evaluated on the test split only and called it ``val``: its ``val_*`` history
    columns and ``final_val_*`` metrics are copied to the ``test_*`` names (``final_test_acc5``,
    ``final_test_loss``, ``best_epoch_test_acc1``, ...). The ``val_*`` names are kept as they were
    recorded, as aliases of the test numbers, so a v1 study's ``--metric final_val_acc1`` still reads
    its published numbers; they are no validation-split numbers (use ``final_test_acc1`` to compare
    with schema 2 records). A record of the current schema (or without ``schema_version``) is
    returned as it is.

    Args:
        data: the record as read (:func:`read_results`).
    """
    if data.get("schema_version") != 1:
        return dict(data)
    upgraded = dict(data)
    history = [dict(row) if isinstance(row, Mapping) else row for row in data.get("history") or []]
    for row in history:
        if isinstance(row, dict):
            for column in EVAL_COLUMNS:
                row.setdefault(f"test_{column}", row.get(f"val_{column}"))
    upgraded["history"] = history
    metrics = dict(data.get("metrics") or {})
    for column in EVAL_COLUMNS:
        metrics.setdefault(f"final_test_{column}", metrics.get(f"final_val_{column}"))
    metrics.setdefault("best_test_acc1", metrics.get("best_val_acc1"))
    # v1's best_epoch was picked on the test split: its test accuracy is best_test_acc1.
    metrics.setdefault("best_epoch_test_acc1", metrics.get("best_val_acc1"))
    upgraded["metrics"] = metrics
    return upgraded


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf: a non-finite number is recorded as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def total_wall_time(record: Mapping[str, Any]) -> float | None:
    """Seconds a run took over all its attempts (a resumed run's ``wall_time_s`` is its last attempt's).

    Each attempt counts its own ``wall_time_s``. Records written before attempts carried it count
    ``finished_at - started_at`` instead (to the second), the last attempt the record's ``wall_time_s``,
    and an attempt whose process died before it finished nothing. A record without attempts (a W&B run)
    gives its ``wall_time_s``.

    Args:
        record: a ``results.json`` object (:func:`read_results`).

    Returns:
        The seconds, or None when the record has no attempts and no ``wall_time_s``.
    """
    attempts = [a for a in record.get("attempts") or [] if isinstance(a, Mapping)]
    if not attempts:
        return _seconds(record.get("wall_time_s"))
    total = 0.0
    for index, attempt in enumerate(attempts):
        seconds = _seconds(attempt.get("wall_time_s"))
        if seconds is None and index == len(attempts) - 1:
            seconds = _seconds(record.get("wall_time_s"))
        if seconds is None:
            seconds = _seconds_between(attempt.get("started_at"), attempt.get("finished_at"))
        total += seconds or 0.0
    return round(total, 3)


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        return (_dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


def now_iso(timestamp: float | None = None) -> str:
    """A UTC time as ISO 8601 to the second (now, or ``timestamp``)."""
    moment = _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc) if timestamp else _dt.datetime.now(_dt.timezone.utc)
    return moment.isoformat(timespec="seconds")


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Atomically write ``results`` to ``output_dir/results.json`` (validating the status)."""
    status = results.get("status")
    if status not in STATUSES:
        raise ValueError(f"results status must be one of {STATUSES}, got {status!r}")
    data = {"schema_version": SCHEMA_VERSION, **results}
    return atomic_write_json(Path(output_dir) / RESULTS_FILENAME, data)


def overwrite_results(output_dir: str | os.PathLike, results: Mapping[str, Any]) -> bool:
    """Write a final record over the existing ``results.json`` in place, compact and without the
    traceback, when :func:`write_results` hit a full disk (see :func:`mbn.utils.io.overwrite_in_place`).

    When even that does not fit in the old record's bytes, the per-epoch ``history`` is left out too
    (the metrics stay; a resumed run gets the history back from its checkpoint).

    Returns:
        False when there is no record to overwrite or the compact one does not fit in it.
    """
    status = results.get("status")
    if status not in STATUSES:
        raise ValueError(f"results status must be one of {STATUSES}, got {status!r}")
    for left_out in (("traceback",), ("traceback", "history")):
        data = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in results.items() if k not in left_out}}
        if overwrite_in_place(Path(output_dir) / RESULTS_FILENAME, json.dumps(data, separators=(",", ":"), default=str).encode()):
            return True
    return False


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read one ``results.json`` (a file path or the run dir holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILENAME
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "status" not in data:
        raise ValueError(f"{path} is not an mbn results.json (no 'status' key)")
    data.setdefault("output_dir", str(path.parent))
    return data


def iter_results(*roots: str | os.PathLike) -> Iterator[Path]:
    """Yield every ``results.json`` below the given dirs, sorted, skipping hidden dirs."""
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name == RESULTS_FILENAME:
            yield root
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"no such sweep or run dir: {root}")
        for path in sorted(root.rglob(RESULTS_FILENAME)):
            if not any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
                yield path


def copy_results(
    source: str | os.PathLike,
    target: str | os.PathLike,
    keep: Callable[[dict[str, Any]], bool],
    overwrite: bool = True,
) -> list[Path]:
    """Copy the ``results.json`` below ``source`` that ``keep`` accepts to ``target``, each under
    its run dir's path relative to ``source`` (a sweep dir's layout is kept, so the copies read as
    the same runs).

    Args:
        source: a sweep dir or a tree of run dirs.
        target: where the copies go (created as needed).
        keep: which records, given the record read (:func:`read_results`).
        overwrite: False leaves a run dir of ``target`` that already holds a record as it is.

    Returns:
        The records written.
    """
    source, target = Path(source), Path(target)
    copied = []
    for record in iter_results(source):
        destination = target / record.parent.relative_to(source) / RESULTS_FILENAME
        if (not overwrite and destination.exists()) or not keep(read_results(record)):
            continue
        data = record.read_bytes()
        atomic_write(destination, lambda f: f.write(data))
        copied.append(destination)
    return copied


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys: ``{"data": {"batch_size": 2}}`` -> ``{"data.batch_size": 2}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
