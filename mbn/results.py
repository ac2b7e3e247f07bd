"""The ``results.json`` every run writes: its schema, writer and reader.

This file is the contract between training (which writes it), sweeps (which skip runs whose
``results.json`` says ``completed`` for the same ``config_hash``) and ``mbn-compare`` (which reads
it). Pure Python: no torch, Lightning or Hydra import.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
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
        "final_val_acc1": 0.81, "best_val_acc1": 0.82, "best_epoch": 9,
        "final_val_acc5": 0.99, "final_val_loss": 0.6,
        "final_test_acc1": 0.81, "best_test_acc1": 0.82,
        "final_train_loss": 0.3
      },
      "history": [                          # one row per finished epoch
        {"epoch": 1, "train_loss": ..., "train_acc1": ..., "val_loss": ..., "val_acc1": ...,
         "val_acc5": ..., "lr": ..., "lam": ... or null, "tau": ... or null, "time_s": ...}
      ],
      "attempts": [                         # one per start of this run dir (resumes add one)
        {"started_at": ..., "finished_at": ..., "status": ..., "resumed_from": null or ckpt path,
         "host": ..., "pid": ..., "num_threads": ..., "cuda_visible_devices": ...}
      ],
      "wall_time_s": 123.4,
      "started_at": "2026-11-25T12:00:00+00:00", "finished_at": "...",
      "versions": {"mbn": "0.1.0", "torch": "...", "pytorch_lightning": "..."}
    }
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from mbn.utils.io import atomic_write_json

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"
STATUSES = ("running", "completed", "failed", "diverged", "interrupted")

# Keys that change where or how a run executes but not what it computes; they are left out of
# the config hash so that moving a sweep or changing the launcher does not rerun finished work.
HASH_EXCLUDED_KEYS = ("output_root", "hydra", "logger", "paths", "sweep_name", "run_name")


def config_hash(config: Mapping[str, Any], exclude: tuple[str, ...] = HASH_EXCLUDED_KEYS) -> str:
    """Stable short hash of a resolved config, ignoring top-level keys in ``exclude``.

    Args:
        config: resolved config as nested plain dicts/lists/scalars.
        exclude: top-level keys that do not affect what the run computes.

    Returns:
        16 hex characters.
    """
    kept = {k: v for k, v in config.items() if k not in exclude}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Atomically write ``results`` to ``output_dir/results.json`` (validating the status)."""
    status = results.get("status")
    if status not in STATUSES:
        raise ValueError(f"results status must be one of {STATUSES}, got {status!r}")
    data = {"schema_version": SCHEMA_VERSION, **results}
    return atomic_write_json(Path(output_dir) / RESULTS_FILENAME, data)


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
