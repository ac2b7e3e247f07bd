"""Read run results (``results.json`` files or converted W&B runs) into pandas tables.

Every results.json found becomes one row of :attr:`RunSet.runs`, including the ones that cannot be
read or whose ``schema_version`` this code does not know (status ``unreadable``), so later stages can
account for every run instead of dropping some.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from mbn.results import (
    LOCK_FILENAME,
    METRIC_KEYS,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    flatten,
    iter_results,
    read_results,
    summarize_history,
    total_wall_time,
    upgrade_record,
)
from mbn.utils.io import is_file_locked

UNREADABLE = "unreadable"
# results.json layouts this module can read (older ones in the current names, mbn.results.upgrade_record);
# a record without the key (a converted W&B run) is taken to be in the current one.
KNOWN_SCHEMA_VERSIONS = READABLE_SCHEMA_VERSIONS

# The error shown for a run recorded "running" whose process is gone (listed as interrupted).
STALE_RUNNING = "its process ended without a final status (killed, or out of disk); a rerun resumes it"
# Metrics a record holds with a value that is not a number (JSON text {metric: problem}), or None.
INVALID_METRICS = "invalid_metrics"
# Per-run columns that are not config keys or metrics.
META_COLUMNS = (
    "source", "run_dir", "status", "error", "epochs_completed", "wall_time_s", "total_wall_time_s",
    "config_hash", "started_at", "finished_at", "schema_version", INVALID_METRICS,
)

# Top-level shortcuts of results.json used when the nested config lacks the key (e.g. W&B runs
# logged with a partial config).
CONFIG_FALLBACKS = {
    "norm.name": "norm",
    "model.name": "model",
    "data.name": "dataset",
    "data.batch_size": "batch_size",
    "seed": "seed",
    "epochs": "epochs",
}


@dataclass
class RunSet:
    """All runs of one or more sweeps.

    Attributes:
        runs: one row per run (index ``run_id``), columns: :data:`META_COLUMNS`, one column per metric
            of ``results["metrics"]`` and one per flattened config key (``"norm.name"``,
            ``"data.batch_size"``, ...).
        history: long table of per-epoch rows, columns ``run_id``, ``epoch`` and the history keys
            (``test_acc1``, ``val_acc1``, ``lam``, ``tau``, ...).
        config_keys: the columns of ``runs`` that come from the config.
        metric_keys: the columns of ``runs`` that come from ``results["metrics"]`` (always including
            :data:`mbn.results.METRIC_KEYS`, empty until a run reports them).
    """

    runs: pd.DataFrame
    history: pd.DataFrame
    config_keys: list[str]
    metric_keys: list[str]

    def __len__(self) -> int:
        return len(self.runs)

    def resolve_key(self, key: str) -> str:
        """Map a user-given key to a column: exact name, else ``key + ".name"`` (``norm`` -> ``norm.name``).

        Args:
            key: a config key, metric or meta column.

        Raises:
            KeyError: with close matches, when no column fits.
        """
        columns = list(self.runs.columns)
        if key in columns:
            return key
        if f"{key}.name" in columns:
            return f"{key}.name"
        close = difflib.get_close_matches(key, columns, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown key {key!r}: not in the runs' config, metrics or fields{hint}")


def read_records(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Mapping[str, Any] | Exception]]:
    """``(path, results dict or read error)`` for every ``results.json`` under ``paths``.

    Args:
        paths: dirs searched recursively (hidden dirs skipped) or results.json files.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    records: list[tuple[str, Mapping[str, Any] | Exception]] = []
    for path in iter_results(*paths):
        try:
            records.append((str(path), read_results(path)))
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            records.append((str(path), exc))
    return records


def collect_runs(paths: Sequence[str | os.PathLike]) -> RunSet:
    """Read every ``results.json`` under ``paths`` (sweep dirs, run dirs or results.json files).

    A file that cannot be parsed becomes a run with status ``unreadable`` and the parse error.

    Args:
        paths: dirs searched recursively (hidden dirs skipped) or results.json files.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    return runset_from_records(read_records(paths))


def load_runs(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The per-run table of :func:`collect_runs` (one row per results.json found).

    Args:
        paths: sweep dirs, run dirs or results.json files.
    """
    return collect_runs(paths).runs


def runset_from_records(records: Iterable[tuple[str, Mapping[str, Any] | Exception]]) -> RunSet:
    """Build a :class:`RunSet` from ``(source, results dict or read error)`` pairs.

    A record whose ``schema_version`` is not in :data:`KNOWN_SCHEMA_VERSIONS` becomes an ``unreadable``
    run: its fields may mean something else, so none of them is used. An older known one is read in
    the current names (:func:`mbn.results.upgrade_record`: a schema 1 record's test-split numbers
    get their ``test_*`` names and keep their ``val_*`` ones as aliases).

    Args:
        records: ``source`` names where the run came from (a results.json path or a W&B run URL);
            the second item is the results dict (schema of :mod:`mbn.results`) or the exception raised
            while reading it.
    """
    rows: list[dict[str, Any]] = []
    history_rows: list[dict[str, Any]] = []
    config_keys: dict[str, None] = {}
    metric_keys: dict[str, None] = dict.fromkeys(METRIC_KEYS)
    for run_id, (source, results) in enumerate(records):
        if isinstance(results, Exception):
            row = {"source": source, "run_dir": run_location(source), "status": UNREADABLE,
                   "error": first_line(f"{type(results).__name__}: {results}")}
            # The job's config as Hydra saved it beside the record: the run is listed under its
            # seed and cell, so a missing seed is not also reported as "no run found".
            for key, value in _saved_job_config(source).items():
                row.setdefault(key, _scalar(value))
                config_keys[key] = None
            rows.append(row)
            continue
        version = results.get("schema_version", SCHEMA_VERSION)
        if not _is_known_schema(version):
            known = ", ".join(str(v) for v in KNOWN_SCHEMA_VERSIONS)
            rows.append({"source": source, "run_dir": run_location(source, results), "status": UNREADABLE,
                         "error": f"unknown schema_version {version!r} (this mbn-compare reads {known})"})
            continue
        results = upgrade_record(results)
        row = {**_meta_row(source, results), "schema_version": version}
        history = [epoch_row for epoch_row in results.get("history") or [] if isinstance(epoch_row, Mapping)]
        metrics = dict(results.get("metrics") or {})
        # A record written before a metric joined the schema (final_train_acc1) gets it from its history.
        for key, value in summarize_history(history)["metrics"].items():
            metrics.setdefault(key, value)
        invalid = {}
        for key, value in metrics.items():
            problem = metric_problem(value)
            if problem:
                invalid[key] = problem
                value = None
            row[key] = _scalar(value)
            metric_keys[key] = None
        row[INVALID_METRICS] = json.dumps(invalid) if invalid else None
        config = flatten(results.get("config") or {})
        for key, top_level in CONFIG_FALLBACKS.items():
            if key not in config and results.get(top_level) is not None:
                config[key] = results[top_level]
        for key, value in config.items():
            column = f"config.{key}" if key in row else key
            row[column] = _scalar(value)
            config_keys[column] = None
        rows.append(row)
        for epoch_row in history:
            history_rows.append({"run_id": run_id, **{k: _scalar(v) for k, v in epoch_row.items()}})
    runs = pd.DataFrame(rows, columns=_ordered_columns(rows))
    runs.index.name = "run_id"
    history = pd.DataFrame(history_rows)
    if history.empty:
        history = pd.DataFrame(columns=["run_id", "epoch"])
    return RunSet(runs=runs, history=history, config_keys=list(config_keys), metric_keys=list(metric_keys))


def schema1_note(runset: RunSet, keys: Sequence[str]) -> str | None:
    """What a reader must know when ``keys`` (a metric, a history column) read ``val_*`` numbers of
    schema 1 records, which are test-split numbers; None when they do not.

    Args:
        runset: the runs.
        keys: the metric and history keys a comparison shows.
    """
    val_keys = [key for key in keys if key.startswith(("val_", "final_val_", "best_val_"))]
    if not val_keys or "schema_version" not in runset.runs:
        return None
    old = int((runset.runs["schema_version"] == 1).sum())
    if not old:
        return None
    test_keys = ", ".join(key.replace("val_", "test_", 1) for key in val_keys)
    return (f"{old} run(s) are schema 1 records (no validation split): their {', '.join(val_keys)} are test-split numbers, "
            f"the same as {test_keys}; compare them with schema 2 runs by {test_keys}")


def metric_problem(value: Any) -> str | None:
    """Why a recorded metric value is not usable: ``"is nan"``, ``"is '0.9' (a str, not a number)"``; None
    for a number or a missing value (None).

    Args:
        value: the value as read from the record.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {value!r} (a {type(value).__name__}, not a number)"
    if not math.isfinite(value):
        return f"is {value}"
    return None


def _saved_job_config(source: str) -> dict[str, Any]:
    """The grid keys (:data:`CONFIG_FALLBACKS`) of the ``.hydra/config.yaml`` Hydra saved beside a results.json
    (``{}`` when there is none or it is unreadable)."""
    if "://" in source:
        return {}
    path = Path(source).parent / ".hydra" / "config.yaml"
    try:
        import yaml

        config = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - missing, unreadable or not YAML: the run is listed without it
        return {}
    if not isinstance(config, dict):
        return {}
    # Only the keys that place a run in the table (the saved file keeps interpolations unresolved).
    return {key: value for key, value in flatten(config).items()
            if key in CONFIG_FALLBACKS and not (isinstance(value, str) and "${" in value)}


def run_location(source: str, results: Mapping[str, Any] | None = None) -> str:
    """Where a run was found: the dir of its results.json for a file read from disk, else (a W&B run)
    the ``output_dir`` its record names.

    The ``output_dir`` inside a results.json is where the run was written; a copied or moved sweep
    still carries the old path, so local runs are listed where their file is now.

    Args:
        source: the results.json path or a W&B run URL.
        results: the run's record, when it could be read.
    """
    if "://" in source:
        return str((results or {}).get("output_dir") or source)
    return str(Path(source).parent)


def first_line(text: str | None) -> str:
    """The first non-empty line of ``text`` (an error message), or ``""``."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def plain(value: Any) -> Any:
    """Comparable Python value: NaN/None -> None, numpy -> Python, integral float -> int (pandas upcasts
    int columns with gaps to float), unhashable -> JSON text."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)


def _meta_row(source: str, results: Mapping[str, Any]) -> dict[str, Any]:
    error = results.get("error")
    status = str(results.get("status"))
    error = first_line(error if isinstance(error, str) else (json.dumps(error) if error else ""))
    if status == "running" and _process_gone(source):
        status, error = "interrupted", STALE_RUNNING
    return {
        "source": source,
        "run_dir": run_location(source, results),
        "status": status,
        "error": error,
        "epochs_completed": results.get("epochs_completed"),
        "wall_time_s": results.get("wall_time_s"),
        "total_wall_time_s": total_wall_time(results),
        "config_hash": results.get("config_hash"),
        "started_at": results.get("started_at"),
        "finished_at": results.get("finished_at"),
    }


def _process_gone(source: str) -> bool:
    """A local run recorded ``running`` whose dir lock (``mbn.train.run_dir.job_lock``) no process holds: it died."""
    if "://" in source:
        return False
    lock = Path(source).parent / LOCK_FILENAME
    if not lock.exists():
        return False  # not written by mbn-train's job owner (or by an older one): nothing to tell
    try:
        return not is_file_locked(lock)
    except OSError:  # a filesystem without flock: cannot tell
        return False


def _is_known_schema(version: Any) -> bool:
    # bool is an int subclass: True must not pass for version 1
    return isinstance(version, int) and not isinstance(version, bool) and version in KNOWN_SCHEMA_VERSIONS


def _scalar(value: Any) -> Any:
    """Make a config/metric value a hashable scalar (lists/dicts as compact JSON) so it can be grouped."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _ordered_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = dict.fromkeys((*META_COLUMNS, *METRIC_KEYS))
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)
