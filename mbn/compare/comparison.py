"""One comparison of a set of runs: the table, the problems, the figures, and writing them all out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from mbn.compare.aggregate import Grid, GridSpec, build_grid
from mbn.compare.collect import RunSet
from mbn.compare.plots import plot_curves, plot_mbn_schedule, plot_metric_vs_batch_size, save_figure
from mbn.compare.problems import GridNote, RunProblem, grid_notes, run_problems, short_key
from mbn.compare.report import ReportInput, write_report
from mbn.compare.table import FILE_SUFFIXES, format_table
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
    """

    runset: RunSet
    grid: Grid
    problems: list[RunProblem]
    notes: list[GridNote]
    curve_col: Any
    curve_metric: str = "val_acc1"

    def figures(self) -> list[tuple[str, str, Figure]]:
        """``(file stem, title, figure)`` of every plot that has data."""
        spec = self.grid.spec
        figures = []
        if self.grid.max_n:
            figures.append((f"{spec.metric}_vs_{_stem(short_key(spec.cols))}",
                            f"{spec.metric} vs {short_key(spec.cols)}", plot_metric_vs_batch_size(self.grid)))
        curves = plot_curves(self.runset, self.grid, self.curve_col, self.curve_metric)
        if curves is not None:
            figures.append((f"{self.curve_metric}_vs_epoch_{_stem(short_key(spec.cols))}{_stem(self.curve_col)}",
                            f"{self.curve_metric} vs epoch at {short_key(spec.cols)}={self.curve_col}", curves))
        schedule = plot_mbn_schedule(self.runset, self.grid)
        if schedule is not None:
            figures.append(("mbn_lam_tau_vs_epoch", "MBN lam and tau vs epoch", schedule))
        return figures


def compare(runset: RunSet, spec: GridSpec, curve_col: Any = None, curve_metric: str = "val_acc1",
            statuses: Sequence[str] = ("completed",)) -> Comparison:
    """Aggregate ``runset`` into the table of ``spec`` and collect what it leaves out.

    Args:
        runset: the runs.
        spec: the layout (resolved column names).
        curve_col: column value for the accuracy-vs-epoch plot; default the smallest one.
        curve_metric: history key for that plot.
        statuses: run statuses whose metric goes into the table.

    Raises:
        UnknownColumnValue: ``curve_col`` is not one of the table's columns.
    """
    grid = build_grid(runset, spec, statuses)
    if curve_col is None:
        curve_col = grid.col_keys[0] if grid.col_keys else None
    elif curve_col not in grid.col_keys:
        raise UnknownColumnValue(f"--curve-batch-size {curve_col!r} is not among the {spec.cols} values "
                         f"{grid.col_keys}")
    problems = run_problems(runset, spec, statuses)
    return Comparison(runset=runset, grid=grid, problems=problems, notes=grid_notes(grid, runset, problems),
                      curve_col=curve_col, curve_metric=curve_metric)


def write_outputs(comparison: Comparison, out_dir: str | os.PathLike, sources: Sequence[str] = ()) -> list[Path]:
    """Write the table in every format, each plot as PNG and SVG, ``runs.csv`` and ``report.html``.

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
        text = format_table(comparison.grid, fmt).encode("utf-8")
        written.append(atomic_write(out_dir / f"table.{FILE_SUFFIXES[fmt]}", lambda f, text=text: f.write(text)))
    runs_csv = comparison.runset.runs.to_csv().encode("utf-8")
    written.append(atomic_write(out_dir / "runs.csv", lambda f: f.write(runs_csv)))
    pngs = []
    for stem, title, fig in comparison.figures():
        pngs.append((title, save_figure(fig, out_dir, stem)["png"]))
        written += [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    report = ReportInput(runset=comparison.runset, grid=comparison.grid, problems=comparison.problems,
                         notes=comparison.notes, figures=pngs, sources=list(sources))
    written.append(write_report(out_dir / "report.html", report))
    return written


def _stem(value: Any) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(value))
