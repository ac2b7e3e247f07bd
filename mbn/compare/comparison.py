"""One comparison of a set of runs: the table, the differences to a baseline, the problems, the figures,
and writing them all out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from matplotlib.figure import Figure

from mbn.compare.aggregate import DEFAULT_CURVE_METRIC, Grid, GridSpec, build_grid
from mbn.compare.collect import RunSet
from mbn.compare.differences import DEFAULT_DETECT, DifferenceTable, compute_differences, format_differences
from mbn.compare.plots import (
    plot_curves, plot_differences, plot_mbn_schedule, plot_metric_vs_batch_size, save_figure,
)
from mbn.compare.problems import GridNote, RunProblem, grid_notes, run_problems, short_key
from mbn.compare.report import ReportInput, write_report
from mbn.compare.stats import STD
from mbn.compare.table import CSV_FLOAT_FORMAT, FILE_SUFFIXES, cells_frame, format_table, interval_label
from mbn.utils.io import atomic_write

TABLE_FORMATS_WRITTEN = ("text", "markdown", "csv", "latex")


class UnknownColumnValue(ValueError):
    """The requested curve column (batch size) is not a column of the table."""


@dataclass
class Comparison:
    """The table of a run set plus everything that explains it.

    Attributes:
        runset: all runs.
        grid: the aggregated table.
        problems: runs left out of the table (with the reason).
        notes: missing cells/seeds and duplicates.
        curve_col: column value (batch size) of the accuracy-vs-epoch plot.
        curve_metric: history key of that plot.
        interval: what the cells and error bars show around the mean (:data:`~mbn.compare.stats.INTERVALS`).
        differences: each row against the baseline row; None without a baseline.
    """

    runset: RunSet
    grid: Grid
    problems: list[RunProblem]
    notes: list[GridNote]
    curve_col: Any
    curve_metric: str = DEFAULT_CURVE_METRIC
    interval: str = STD
    differences: DifferenceTable | None = None

    def format(self, fmt: str = "text", decimals: int = 2) -> str:
        """The table, followed by the difference table when there is a baseline.

        In CSV, which holds one table, the difference columns are joined onto the baseline-compared cells
        instead (the long difference table alone is :meth:`DifferenceTable.to_frame`, ``differences.csv``).

        Args:
            fmt: one of :data:`~mbn.compare.table.FORMATS`.
            decimals: digits after the point.
        """
        table = format_table(self.grid, fmt, decimals=decimals, interval=self.interval)
        if self.differences is None:
            return table
        if fmt == "csv":
            return self.cells_with_differences().to_csv(index=False, float_format=CSV_FLOAT_FORMAT)
        return table + "\n" + format_differences(self.differences, fmt, decimals=decimals)

    def cells_with_differences(self) -> pd.DataFrame:
        """The cells of the table CSV, each compared row's cell with its difference columns (empty for the
        baseline rows)."""
        cells = cells_frame(self.grid, self.interval)
        keys = [*self.grid.spec.rows, self.grid.spec.cols]
        differences = self.differences.to_frame().drop(columns=["metric", "n"])
        return cells.merge(differences, on=keys, how="left") if len(differences) else cells

    def figures(self) -> list[tuple[str, str, Figure]]:
        """``(file stem, title, figure)`` of every plot that has data, the differences plot excluded."""
        spec = self.grid.spec
        figures = []
        if self.grid.max_n:
            bars = interval_label(self.interval, spec.over)
            figures.append((f"{spec.metric}_vs_{_stem(short_key(spec.cols))}",
                            f"{spec.metric} vs {short_key(spec.cols)} (error bars: {bars})",
                            plot_metric_vs_batch_size(self.grid, self.interval)))
        curves = plot_curves(self.runset, self.grid, self.curve_col, self.curve_metric)
        if curves is not None:
            figures.append((f"{self.curve_metric}_vs_epoch_{_stem(short_key(spec.cols))}{_stem(self.curve_col)}",
                            f"{self.curve_metric} vs epoch at {short_key(spec.cols)}={self.curve_col}", curves))
        schedule = plot_mbn_schedule(self.runset, self.grid)
        if schedule is not None:
            figures.append(("mbn_lam_tau_vs_epoch", "MBN lam and tau vs epoch", schedule))
        return figures

    def difference_figure(self) -> tuple[str, str, Figure] | None:
        """``(file stem, title, figure)`` of the differences to the baseline; None without a baseline or data."""
        if self.differences is None:
            return None
        fig = plot_differences(self.differences)
        if fig is None:
            return None
        spec = self.grid.spec
        base = self.differences.baseline_label
        return (f"{spec.metric}_difference_to_{_stem(base)}_vs_{_stem(short_key(spec.cols))}",
                f"{spec.metric}: difference to {base} vs {short_key(spec.cols)} (error bars: 95% t CI)", fig)


def compare(runset: RunSet, spec: GridSpec, curve_col: Any = None, curve_metric: str = DEFAULT_CURVE_METRIC,
            statuses: Sequence[str] = ("completed",), interval: str = STD, baseline: str | None = None,
            detect: float = DEFAULT_DETECT) -> Comparison:
    """Aggregate ``runset`` into the table of ``spec``, compare with the baseline and collect what it leaves out.

    Args:
        runset: the runs.
        spec: the layout (resolved column names).
        curve_col: column value for the accuracy-vs-epoch plot; default the smallest one.
        curve_metric: history key for that plot.
        statuses: run statuses whose metric goes into the table.
        interval: what the cells and error bars show around the mean (:data:`~mbn.compare.stats.INTERVALS`).
        baseline: a row (``bn``) to compare every other row with (see
            :func:`~mbn.compare.differences.resolve_baselines`); None for no difference table.
        detect: difference (points for accuracies) the seeds-needed estimate is for.

    Raises:
        UnknownColumnValue: ``curve_col`` is not one of the table's columns.
        UnknownBaseline: ``baseline`` names no row.
    """
    grid = build_grid(runset, spec, statuses)
    if curve_col is None:
        curve_col = grid.col_keys[0] if grid.col_keys else None
    elif curve_col not in grid.col_keys:
        raise UnknownColumnValue(f"--curve-batch-size {curve_col!r} is not among the {spec.cols} values "
                         f"{grid.col_keys}")
    problems = run_problems(runset, spec, statuses)
    differences = compute_differences(grid, baseline, detect) if baseline is not None else None
    return Comparison(runset=runset, grid=grid, problems=problems, notes=grid_notes(grid, runset, problems),
                      curve_col=curve_col, curve_metric=curve_metric, interval=interval, differences=differences)


def write_outputs(comparison: Comparison, out_dir: str | os.PathLike, sources: Sequence[str] = ()) -> list[Path]:
    """Write the table in every format, each plot as PNG and SVG, ``runs.csv`` and ``report.html``; with a
    baseline also ``differences.csv`` and the differences plot.

    The files an earlier call wrote into ``out_dir`` and this one does not (a plot at another batch
    size, ``differences.csv`` of a comparison with a baseline) are removed; other files are left.

    Args:
        comparison: what to write.
        out_dir: created if missing.
        sources: what was read, shown in the report.

    Returns:
        The written files.
    """
    out_dir = Path(out_dir)
    written = []
    for fmt in TABLE_FORMATS_WRITTEN:
        text = comparison.format(fmt).encode("utf-8")
        written.append(atomic_write(out_dir / f"table.{FILE_SUFFIXES[fmt]}", lambda f, text=text: f.write(text)))
    runs_csv = comparison.runset.runs.to_csv().encode("utf-8")
    written.append(atomic_write(out_dir / "runs.csv", lambda f: f.write(runs_csv)))
    if comparison.differences is not None:
        differences_csv = format_differences(comparison.differences, "csv").encode("utf-8")
        written.append(atomic_write(out_dir / "differences.csv", lambda f: f.write(differences_csv)))
    pngs = []
    for stem, title, fig in comparison.figures():
        pngs.append((title, save_figure(fig, out_dir, stem)["png"]))
        written += [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    difference_png = None
    difference_figure = comparison.difference_figure()
    if difference_figure is not None:
        stem, title, fig = difference_figure
        difference_png = (title, save_figure(fig, out_dir, stem)["png"])
        written += [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    report = ReportInput(runset=comparison.runset, grid=comparison.grid, problems=comparison.problems,
                         notes=comparison.notes, figures=pngs, sources=list(sources), interval=comparison.interval,
                         differences=comparison.differences, difference_figure=difference_png)
    written.append(write_report(out_dir / "report.html", report))
    _remove_earlier_outputs(out_dir, written)
    return written


# The files a write_outputs wrote, listed in its out dir, so the next one into that dir removes
# those it does not write again: no plot or differences.csv of another comparison is left beside
# the new ones, and no file of the user's is touched.
WRITTEN_LIST = ".mbn-compare-written"


def _remove_earlier_outputs(out_dir: Path, written: Sequence[Path]) -> None:
    listing = out_dir / WRITTEN_LIST
    now = {path.name for path in written}
    earlier = listing.read_text(encoding="utf-8").splitlines() if listing.exists() else []
    for name in earlier:
        if name and name not in now and "/" not in name:
            (out_dir / name).unlink(missing_ok=True)
    text = "".join(f"{name}\n" for name in sorted(now)).encode("utf-8")
    atomic_write(listing, lambda f: f.write(text))


def _stem(value: Any) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(value))
