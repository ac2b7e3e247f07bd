"""Aggregate runs into the paper's grid: rows x columns, each cell a mean/std of a metric over seeds.

Each run either contributes to one cell or gets a reason why not (failed, running, metric
missing, ...), so the table and the problems list together account for every run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from mbn.compare.collect import INVALID_METRICS, UNREADABLE, RunSet, plain

DEFAULT_ROWS = ("norm.name",)
# Added to the rows only when they take more than one value across the runs.
OPTIONAL_ROWS = ("model.name", "data.name")
DEFAULT_COLS = "data.batch_size"
DEFAULT_OVER = "seed"
# The test split's accuracy after the last epoch (no epoch chosen on the test images); tuning reads
# the validation split's (final_val_acc1, best_val_acc1) instead.
DEFAULT_METRIC = "final_test_acc1"
# History column of the per-epoch plot.
DEFAULT_CURVE_METRIC = "test_acc1"
TABLE_STATUSES = ("completed",)
# Why a run is not in the table when another run of the same config hash stands for it (duplicate_runs).
DUPLICATE = "duplicate"

# Paper order of the normalizations; others follow alphabetically.
NORM_ORDER = ("bn", "gn", "brn", "mbn", "none")


@dataclass(frozen=True)
class GridSpec:
    """Which keys make the rows, the columns and the repeats of the table, and which metric fills it.

    Args:
        rows: column names (resolved, e.g. ``("norm.name",)``) whose values label a table row.
        cols: column name whose values are the table columns (``"data.batch_size"``).
        over: column name that distinguishes repeats of a cell (``"seed"``).
        metric: metric column averaged in each cell (``"final_test_acc1"``).
    """

    rows: tuple[str, ...] = DEFAULT_ROWS
    cols: str = DEFAULT_COLS
    over: str = DEFAULT_OVER
    metric: str = DEFAULT_METRIC

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.rows, self.cols, self.over)


@dataclass
class Cell:
    """One table cell: the metric values of the runs with these row and column values.

    ``values`` holds one value per repeat (seed), parallel to ``over_values``: runs of different
    configs that share a seed in a cell (they differ in a key outside the table) are averaged into
    that seed's value, so ``n`` is the number of distinct seeds. ``run_ids`` and ``run_over`` list
    every run in the cell and its seed.
    """

    row: tuple
    col: Any
    values: list[float] = field(default_factory=list)
    over_values: list[Any] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)
    run_over: list[Any] = field(default_factory=list)
    missing_over: list[Any] = field(default_factory=list)
    best: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for fewer than two values."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def duplicated_over(self) -> list[Any]:
        """Repeat values (seeds) that occur in more than one run of this cell."""
        return sorted({v for v in self.run_over if self.run_over.count(v) > 1}, key=sort_key)


@dataclass
class Grid:
    """The aggregated table.

    Attributes:
        spec: the layout.
        row_keys: row labels (tuples of the ``spec.rows`` values), in display order.
        col_keys: column values, sorted.
        cells: ``(row, col) -> Cell`` for every row/column pair (empty cells included).
        expected_over: ``col -> `` the repeat values (seeds) seen in any run of that column: the seeds
            each of its cells should have. Per column, because a design may give some batch sizes
            more seeds than others (5 at m = 2, 3 at m = 32): a cell is complete when it has its
            column's seeds.
        lower_is_better: True for loss-like metrics (the best cell is then the minimum).
    """

    spec: GridSpec
    row_keys: list[tuple]
    col_keys: list[Any]
    cells: dict[tuple[tuple, Any], Cell]
    expected_over: dict[Any, list[Any]]
    lower_is_better: bool

    @property
    def max_n(self) -> int:
        """The most runs (seeds) of any cell; 0 when the table is empty."""
        return max((cell.n for cell in self.cells.values()), default=0)

    def column_max_n(self, col: Any) -> int:
        """The most runs (seeds) of any cell in column ``col``."""
        return max((self.cells[(row, col)].n for row in self.row_keys), default=0)

    def cell(self, row: tuple, col: Any) -> Cell:
        return self.cells[(row, col)]

    def is_incomplete(self, cell: Cell) -> bool:
        """True when the cell has fewer runs than the fullest cell of its column (a seed failed, is
        missing or still running)."""
        return cell.n < self.column_max_n(cell.col)

    def to_frame(self) -> pd.DataFrame:
        """Long table, one row per cell: the row keys, the column key, mean, std, n, best, ... (raw metric units)."""
        records = []
        for row in self.row_keys:
            for col in self.col_keys:
                cell = self.cells[(row, col)]
                records.append({
                    **dict(zip(self.spec.rows, row)),
                    self.spec.cols: col,
                    "mean": cell.mean,
                    "std": cell.std,
                    "n": cell.n,
                    "n_max": self.column_max_n(col),
                    "best": cell.best,
                    "incomplete": self.is_incomplete(cell),
                    self.spec.over: ";".join(str(v) for v in sorted(cell.over_values, key=sort_key)),
                    f"missing_{self.spec.over}": ";".join(str(v) for v in cell.missing_over),
                })
        return pd.DataFrame(records)


def default_rows(runset: RunSet) -> tuple[str, ...]:
    """``norm.name`` plus ``model.name``/``data.name`` when those take several values across the runs."""
    rows = [key for key in DEFAULT_ROWS]
    for key in OPTIONAL_ROWS:
        if key in runset.runs.columns and runset.runs[key].dropna().nunique() > 1:
            rows.append(key)
    return tuple(rows)


def exclusion_reasons(runset: RunSet, spec: GridSpec, statuses: Sequence[str] = TABLE_STATUSES) -> pd.Series:
    """Why each run is not in the table (``None`` for the runs that are).

    Args:
        runset: the runs.
        spec: the table layout (its keys must be columns of ``runset.runs``).
        statuses: run statuses whose metric goes into the table.

    Returns:
        A Series indexed like ``runset.runs`` with a reason string or None.
    """
    runs = runset.runs
    reasons = pd.Series([None] * len(runs), index=runs.index, dtype=object)
    duplicates = duplicate_runs(runset)
    for run_id, run in runs.iterrows():
        if run_id in duplicates:
            reasons[run_id] = DUPLICATE
            continue
        if run["status"] not in statuses:
            reasons[run_id] = run["status"]
            continue
        missing = [key for key in spec.keys if key not in runs.columns or _is_missing(run[key])]
        if missing:
            reasons[run_id] = f"config lacks {', '.join(missing)}"
            continue
        invalid = json.loads(run[INVALID_METRICS]) if isinstance(run.get(INVALID_METRICS), str) else {}
        if spec.metric in invalid:
            reasons[run_id] = f"invalid: metric {spec.metric} {invalid[spec.metric]}"
            continue
        value = run[spec.metric] if spec.metric in runs.columns else None
        if _is_missing(value) or not _is_finite_number(value):
            reasons[run_id] = f"metric {spec.metric} missing"
    return reasons


def duplicate_runs(runset: RunSet) -> dict[int, int]:
    """Runs of a configuration that another run of the same ``config_hash`` stands for: ``{run_id: kept run_id}``.

    A configuration is one run however many dirs hold it (a sweep rerun under other dir names, two
    sweeps combined): the newest completed run of a config hash is kept (the newest run when none
    completed), the others are duplicates, so no seed is counted twice.

    Args:
        runset: the runs.
    """
    runs = runset.runs
    if "config_hash" not in runs.columns or not len(runs):
        return {}
    duplicates: dict[int, int] = {}
    hashed = runs[runs["config_hash"].notna() & (runs["status"] != UNREADABLE)]
    for _, group in hashed.groupby("config_hash", sort=False):
        if len(group) < 2:
            continue

        def age(run_id: int) -> tuple:
            run = group.loc[run_id]
            return (run["status"] == "completed", str(plain(run["finished_at"]) or plain(run["started_at"]) or ""))

        kept = max(group.index, key=age)
        duplicates.update({int(run_id): int(kept) for run_id in group.index if run_id != kept})
    return duplicates


def build_grid(runset: RunSet, spec: GridSpec, statuses: Sequence[str] = TABLE_STATUSES) -> Grid:
    """Aggregate the runs into the table of ``spec``.

    Rows and columns come from every run that has the grid keys (failed and running ones too), so a
    cell whose runs all failed shows up empty instead of disappearing.

    Args:
        runset: the runs.
        spec: the layout; its keys must be columns of ``runset.runs`` (see :meth:`RunSet.resolve_key`).
        statuses: run statuses whose metric goes into the table.
    """
    runs = runset.runs
    for key in (*spec.keys, spec.metric):
        if key not in runs.columns:
            raise KeyError(f"unknown key {key!r}: not a column of the runs")
    reasons = exclusion_reasons(runset, spec, statuses)
    has_keys = runs[list(spec.keys)].notna().all(axis=1) if len(runs) else pd.Series(dtype=bool)
    keyed = runs[has_keys]
    row_keys = sorted({tuple(plain(v) for v in r) for r in keyed[list(spec.rows)].itertuples(index=False)},
                      key=lambda row: tuple(sort_key(v, key) for v, key in zip(row, spec.rows)))
    col_keys = sorted({plain(v) for v in keyed[spec.cols]}, key=sort_key)
    expected_over = {col: sorted({plain(v) for v, c in zip(keyed[spec.over], keyed[spec.cols]) if plain(c) == col}, key=sort_key)
                     for col in col_keys}
    cells = {(row, col): Cell(row=row, col=col) for row in row_keys for col in col_keys}
    per_over: dict[tuple, dict[Any, list[float]]] = {}
    for run_id, run in runs[reasons.isna()].iterrows():
        row = tuple(plain(run[key]) for key in spec.rows)
        cell = cells[(row, plain(run[spec.cols]))]
        cell.run_ids.append(int(run_id))
        cell.run_over.append(plain(run[spec.over]))
        per_over.setdefault((cell.row, cell.col), {}).setdefault(plain(run[spec.over]), []).append(float(run[spec.metric]))
    for key, by_over in per_over.items():
        cell = cells[key]
        cell.over_values = list(by_over)
        cell.values = [statistics.fmean(values) for values in by_over.values()]
    for cell in cells.values():
        cell.missing_over = [v for v in expected_over[cell.col] if v not in cell.over_values]
    lower_is_better = "loss" in spec.metric
    for col in col_keys:
        means = [cells[(row, col)].mean for row in row_keys if cells[(row, col)].n]
        if means:
            target = min(means) if lower_is_better else max(means)
            for row in row_keys:
                cell = cells[(row, col)]
                cell.best = cell.n > 0 and cell.mean == target
    return Grid(spec=spec, row_keys=row_keys, col_keys=col_keys, cells=cells,
                expected_over=expected_over, lower_is_better=lower_is_better)


def sort_key(value: Any, column: str | None = None) -> tuple:
    """Order values numerically when they are numbers, norms in paper order, the rest as text."""
    if column == "norm.name" and value in NORM_ORDER:
        return (0, NORM_ORDER.index(value), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
