"""What the table does not show: runs left out of it, and grid cells that are empty or miss seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from mbn.compare.aggregate import DUPLICATE, TABLE_STATUSES, Grid, GridSpec, duplicate_runs, exclusion_reasons
from mbn.compare.collect import RunSet, plain
from mbn.compare.configdiff import differing_keys


@dataclass(frozen=True)
class RunProblem:
    """A run that is not in the table.

    Attributes:
        run_id: index into ``RunSet.runs``.
        reason: its status (``failed``, ``diverged``, ``running``, ``interrupted``, ``unreadable``) or
            why a completed run could not be used.
        run_dir: where the run lives (its output dir or W&B URL).
        labels: the run's grid key values, e.g. ``{"norm.name": "bn", "data.batch_size": 2, "seed": 0}``.
        progress: ``"epochs_completed/epochs"`` when known.
        error: first line of the run's error.
    """

    run_id: int
    reason: str
    run_dir: str
    labels: dict[str, Any]
    progress: str
    error: str


@dataclass(frozen=True)
class GridNote:
    """A grid cell that is empty, misses repeats (seeds) or has more than one run for a repeat."""

    kind: str  # "not run" | "missing cell" | "missing seeds" | "duplicate runs"
    cell: str
    detail: str


def run_problems(runset: RunSet, spec: GridSpec, statuses: Sequence[str] = TABLE_STATUSES) -> list[RunProblem]:
    """Every run that the table leaves out, with the reason.

    Args:
        runset: the runs.
        spec: the table layout.
        statuses: run statuses that go into the table.
    """
    reasons = exclusion_reasons(runset, spec, statuses)
    duplicates = duplicate_runs(runset)
    problems = []
    for run_id, reason in reasons.items():
        if reason is None:
            continue
        run = runset.runs.loc[run_id]
        labels = {key: plain(run[key]) for key in spec.keys if key in run.index and plain(run[key]) is not None}
        error = run["error"] if isinstance(run["error"], str) else ""
        if reason == DUPLICATE:
            kept = runset.runs.loc[duplicates[int(run_id)]]
            error = f"same config (hash {run['config_hash']}) as the {kept['status']} run used: {kept['run_dir']}"
        problems.append(RunProblem(
            run_id=int(run_id), reason=str(reason), run_dir=str(run["run_dir"]), labels=labels,
            progress=_progress(run), error=error,
        ))
    return problems


def grid_notes(grid: Grid, runset: RunSet, problems: Sequence[RunProblem] = ()) -> list[GridNote]:
    """Empty cells, cells with fewer repeats than the others (naming the missing ones) and duplicates.

    A row's cells that no run of any status belongs to (a design that runs some rows at fewer columns, or
    runs not launched yet) are one ``"not run"`` note for the row; an empty cell that has runs left out of
    the table is a ``"missing cell"`` naming them.

    Args:
        grid: the aggregated table.
        runset: the runs.
        problems: the runs left out of the table; a missing seed that has one is named with its reason.
    """
    spec = grid.spec
    left_out: dict[tuple, list[str]] = {}
    for problem in problems:
        if all(key in problem.labels for key in spec.keys):
            key = tuple(problem.labels[k] for k in spec.keys)
            left_out.setdefault(key, []).append(problem.reason)
    notes = []
    for row in grid.row_keys:
        not_run = []
        for col in grid.col_keys:
            cell = grid.cell(row, col)
            label = cell_label(spec, row, col)

            def why(value: Any) -> str:
                reasons = left_out.get((*row, col, value))
                return f"{spec.over}={value} ({', '.join(reasons) if reasons else 'no run found'})"

            if cell.n == 0 and not any((*row, col, v) in left_out for v in cell.missing_over):
                not_run.append(col)
            elif cell.n == 0:
                notes.append(GridNote("missing cell", label,
                                      "no usable run; " + ", ".join(why(v) for v in cell.missing_over)))
            elif grid.is_incomplete(cell) or cell.missing_over:
                notes.append(GridNote("missing seeds", label,
                                      f"n={cell.n} of {len(grid.expected_over[col])}; " + ", ".join(why(v) for v in cell.missing_over)))
            for value in cell.duplicated_over:
                run_ids = [i for i, v in zip(cell.run_ids, cell.run_over) if v == value]
                dirs = [str(runset.runs.at[i, "run_dir"]) for i in run_ids]
                differing = differing_keys(runset, run_ids)
                notes.append(GridNote("duplicate runs", label,
                                      f"{spec.over}={value} has {len(dirs)} runs of different configs, averaged into "
                                      f"one value (n counts {spec.over}s): {'; '.join(dirs)}"
                                      + (f"; they differ in {', '.join(differing)}" if differing else "")))
        if not_run:
            notes.append(GridNote("not run", _row_part(spec, row),
                                  f"{short_key(spec.cols)}={', '.join(str(c) for c in not_run)} (no run of any status)"))
    return notes


def cell_label(spec: GridSpec, row: tuple, col: Any) -> str:
    """``"norm=bn, m=2"``-style label of a grid cell."""
    return f"{_row_part(spec, row)}, {short_key(spec.cols)}={col}"


def _row_part(spec: GridSpec, row: tuple) -> str:
    """``"norm=bn"``-style label of a grid row (a cell's label without its column)."""
    return ", ".join(f"{short_key(key)}={value}" for key, value in zip(spec.rows, row))


def row_label(row: tuple) -> str:
    """Text of a table row label, e.g. ``"mbn"`` or ``"mbn / resnet18"`` (legends, difference tables)."""
    return " / ".join(str(v) for v in row)


def short_key(key: str) -> str:
    """Display name of a config key: ``norm.name`` -> ``norm``, ``data.batch_size`` -> ``m``."""
    if key == "data.batch_size":
        return "m"
    return key[: -len(".name")] if key.endswith(".name") else key


def _progress(run: pd.Series) -> str:
    done, planned = plain(run.get("epochs_completed")), plain(run.get("epochs"))
    if done is None:
        return ""
    return f"{done}/{planned}" if planned is not None else str(done)
