"""Read runs from Weights & Biases and convert them to results.json-shaped records.

A converted record has the keys :mod:`mbn.compare.collect` reads from a results.json (``status``,
``error``, ``config``, ``metrics``, ``history``, ``output_dir``, ``epochs_completed``), so W&B runs go
through the same table, plots and report as local runs.

Conversion rules (the logging side may use Lightning's ``val/acc1`` or flat ``val_acc1`` names):

- metric keys: ``/`` and ``.`` become ``_`` and a Lightning ``_epoch`` suffix is dropped
  (``val/acc1_epoch`` -> ``val_acc1``); per-layer MBN keys ending in ``_lam``/``_tau`` (``mbn/lam``)
  become ``lam``/``tau`` when no plain ``lam``/``tau`` is logged;
- config: nested dicts as logged, or flat dotted keys (``norm.name``) which are nested again; the
  derived top-level keys mbn-train adds (``norm_name``, ``batch_size``, ``config_hash``, ``output_dir``, ...)
  become the results.json top-level fields of the same meaning;
- status: a logged summary ``status`` (one of :data:`mbn.results.STATUSES`) wins, else the W&B state
  (finished -> completed, crashed/failed -> failed, killed/preempted -> interrupted, running/pending -> running);
- metrics: the summary's results.json metric names (``best_val_acc1``, optionally under ``metrics/``),
  else derived from the history (best = max of ``val_acc1`` / ``test_acc1``, final = the last epoch's
  value); a W&B run has no ``schema_version`` and is read as the current schema (runs logged before
  schema 2 logged the test split as ``val/*``);
- history: one row per ``epoch`` (0-based Lightning epochs are shifted to the 1-based results.json convention).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, TextIO

from mbn.results import METRIC_KEYS, STATUSES

# W&B run.state -> results.json status.
STATE_TO_STATUS = {
    "finished": "completed",
    "crashed": "failed",
    "failed": "failed",
    "killed": "interrupted",
    "preempted": "interrupted",
    "preempting": "interrupted",
    "running": "running",
    "pending": "running",
}

# Top-level keys mbn-train adds to the W&B config next to the resolved config (mbn/train/loggers.py) ->
# the results.json top-level field they are; kept out of the config so they do not show up as config
# differences (output_dir and config_hash differ for every run).
DERIVED_CONFIG_KEYS = {
    "norm_name": "norm",
    "batch_size": "batch_size",
    "global_batch_size": "global_batch_size",
    "world_size": "world_size",
    "config_hash": "config_hash",
    "output_dir": "output_dir",
}

# (results.json metric, history key, reduction) used when the summary lacks the metric.
DERIVED_METRICS = (
    ("best_val_acc1", "val_acc1", "max"),
    ("final_val_acc1", "val_acc1", "last"),
    ("final_val_acc5", "val_acc5", "last"),
    ("final_val_loss", "val_loss", "last"),
    ("best_test_acc1", "test_acc1", "max"),
    ("final_test_acc1", "test_acc1", "last"),
    ("final_test_acc5", "test_acc5", "last"),
    ("final_test_loss", "test_loss", "last"),
    ("final_train_loss", "train_loss", "last"),
    ("final_train_acc1", "train_acc1", "last"),
)
HISTORY_SAMPLES = 100_000


class WandbReadError(RuntimeError):
    """W&B could not be reached or the project could not be read."""


def normalize_key(key: str) -> str:
    """``val/acc1_epoch`` -> ``val_acc1``; ``metrics/best_val_acc1`` -> ``metrics_best_val_acc1``."""
    key = key.replace("/", "_").replace(".", "_")
    return key[: -len("_epoch")] if key.endswith("_epoch") and key != "_epoch" else key


def run_to_record(run: Any) -> dict[str, Any]:
    """Convert one W&B API run (``wandb.apis.public.Run`` or an object with the same attributes).

    Uses ``run.config``, ``run.summary`` (mapping-like), ``run.state``, ``run.name``, ``run.id``,
    ``run.group``, ``run.url`` / ``run.path`` and ``run.history(samples=..., pandas=False)``.

    Args:
        run: the W&B run.

    Returns:
        A results.json-shaped dict (see the module docstring).
    """
    config = _nest(_plain(run.config))
    config.pop("_wandb", None)
    derived = {field: config.pop(key) for key, field in DERIVED_CONFIG_KEYS.items() if key in config}
    if getattr(run, "group", None) and "sweep_name" not in config:
        config["sweep_name"] = run.group
    summary = {normalize_key(k): v for k, v in _plain(run.summary).items() if not k.startswith("_")}
    history = _history_rows(run.history(samples=HISTORY_SAMPLES, pandas=False))
    state = str(getattr(run, "state", "") or "").lower()
    status = summary.get("status") if summary.get("status") in STATUSES else STATE_TO_STATUS.get(state, "failed")
    error = summary.get("error") if isinstance(summary.get("error"), str) else None
    if status == "failed" and not error:
        error = f"W&B run state: {state or 'unknown'}"
    return {
        "status": status,
        "error": error,
        "config": config,
        "metrics": _metrics(summary, history),
        "history": history,
        "epochs_completed": int(max((row["epoch"] for row in history), default=0)) or summary.get("epoch"),
        **{k: v for k, v in derived.items() if k != "output_dir"},
        "output_dir": _run_url(run),
        "wandb": {"name": getattr(run, "name", None), "id": getattr(run, "id", None), "state": state,
                  "group": getattr(run, "group", None), "tags": list(getattr(run, "tags", None) or []),
                  "local_output_dir": derived.get("output_dir")},
    }


def check_project(project: str) -> None:
    """Raise ValueError unless ``project`` looks like ``ENTITY/PROJECT``."""
    parts = project.split("/")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ValueError(f"--wandb must be ENTITY/PROJECT, got {project!r}")


def fetch_records(project: str, group: str | None = None, *, api: Any = None, timeout: int = 30,
                  progress: TextIO | None = None) -> list[tuple[str, dict[str, Any] | Exception]]:
    """Read the runs of a W&B project as ``(source, record or conversion error)`` pairs.

    Args:
        project: ``"ENTITY/PROJECT"``.
        group: only runs of this W&B group (= sweep name).
        api: a ``wandb.Api``-like object (tests pass a fake); by default ``wandb.Api(timeout=timeout)``.
        timeout: HTTP timeout in seconds for the default API.
        progress: where to print ``run i/N`` progress (e.g. ``sys.stderr``; None: silent).

    Raises:
        ValueError: ``project`` is not ``ENTITY/PROJECT``.
        WandbReadError: W&B cannot be reached, the login is missing or the project does not exist.
    """
    check_project(project)
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=timeout)
        runs = list(api.runs(project, filters={"group": group} if group else None))
    except Exception as exc:  # wandb raises its own CommError/UsageError/ValueError/HTTP errors
        raise WandbReadError(
            f"could not read W&B runs of {project!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            " (is the network reachable, `wandb login` done or WANDB_API_KEY set, and the project name right?)"
        ) from exc
    records: list[tuple[str, dict[str, Any] | Exception]] = []
    for index, run in enumerate(runs, 1):
        if progress is not None:
            print(f"\rreading W&B run {index}/{len(runs)}", end="" if index < len(runs) else "\n", file=progress, flush=True)
        source = _run_url(run)
        try:
            records.append((source, run_to_record(run)))
        except Exception as exc:  # one odd run must not hide the others; it is listed as unreadable
            records.append((source, exc))
    return records


def _run_url(run: Any) -> str:
    try:
        url = run.url
    except Exception:  # the real property needs the service API; fall back to the path
        url = None
    if url:
        return str(url)
    path = getattr(run, "path", None)
    return "wandb:" + "/".join(str(p) for p in path) if path else f"wandb:{getattr(run, 'id', '?')}"


def _plain(value: Any) -> Any:
    """W&B summary/config objects (dict-like with ``items()``) -> plain nested dicts."""
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"norm.name": "bn", "data": {...}}`` -> nested dicts (W&B configs can be logged flat)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Mapping) and set(value) == {"value"}:  # raw W&B config entries {"value": ...}
            value = value["value"]
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"W&B config key {key!r} collides with a scalar at {part!r}")
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf].update(_nest(value))
        else:
            node[leaf] = _nest(value) if isinstance(value, Mapping) else value
    return nested


def _history_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Merge W&B history steps into one row per epoch (last value of each key wins)."""
    by_epoch: dict[float, dict[str, Any]] = {}
    for row in rows:
        normalized = {normalize_key(k): v for k, v in row.items() if not k.startswith("_")}
        epoch = normalized.get("epoch")
        if not _is_number(epoch):
            continue
        merged = by_epoch.setdefault(float(epoch), {})
        merged.update({k: v for k, v in normalized.items() if v is not None and not _is_nan(v)})
    if not by_epoch:
        return []
    shift = 1 if min(by_epoch) == 0 else 0
    history = []
    for epoch in sorted(by_epoch):
        row = by_epoch[epoch]
        for name in ("lam", "tau"):
            if name not in row:
                per_layer = sorted(k for k in row if k.endswith(f"_{name}"))
                if per_layer:
                    row[name] = row[per_layer[0]]
        row["epoch"] = int(epoch) + shift
        history.append(row)
    return history


def _metrics(summary: Mapping[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name in METRIC_KEYS:
        for key in (name, f"metrics_{name}"):
            if _is_number(summary.get(key)):
                metrics[name] = summary[key]
                break
    reducers: dict[str, Callable[[list[float]], float]] = {"max": max, "last": lambda values: values[-1]}
    for name, key, reduction in DERIVED_METRICS:
        values = [row[key] for row in history if _is_number(row.get(key))]
        if name not in metrics and values:
            metrics[name] = reducers[reduction](values)
    if "best_epoch" not in metrics:
        scored = [(row["val_acc1"], row["epoch"]) for row in history if _is_number(row.get("val_acc1"))]
        if scored:
            metrics["best_epoch"] = max(scored)[1]
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
