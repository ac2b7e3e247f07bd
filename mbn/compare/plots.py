"""The paper's figures: accuracy vs batch size, accuracy vs epoch, MBN's lam/tau vs epoch, and the
differences to a baseline row with their confidence intervals.

Figures are built with matplotlib's object API (``Figure``, no pyplot), which renders through Agg
without touching the global backend or leaking figures.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from mbn.compare.aggregate import DEFAULT_CURVE_METRIC, Grid
from mbn.compare.collect import RunSet
from mbn.compare.differences import DifferenceTable, title as difference_title
from mbn.compare.problems import row_label, short_key
from mbn.compare.stats import CONFIDENCE, STD, spread_interval
from mbn.compare.table import interval_label, is_fraction_metric, metric_label, metric_scale
from mbn.utils.io import atomic_write

FIGSIZE = (7.0, 4.5)
DPI = 120


PALETTE = tuple(f"C{i}" for i in range(10))
# Told apart by shape where the color is shared (rows of one norm at several m, say).
MARKERS = ("o", "s", "^", "D", "v")
LINESTYLES = ("-", "--", "-.")


@dataclass(frozen=True)
class RowStyle:
    """How one table row is drawn in every figure."""

    color: str
    marker: str = "o"
    linestyle: str = "-"


def row_styles(grid: Grid) -> dict[tuple, RowStyle]:
    """One fixed style per table row, so a row looks the same in every figure.

    With several row keys (``norm,data.batch_size``) and 2-10 values of the first, the color is the
    first key's (a norm keeps its color) and the marker and line style tell the rest apart; otherwise
    each row has its own color (beyond ten rows, colors repeat with other markers).
    """
    firsts = list(dict.fromkeys(row[0] for row in grid.row_keys))
    rests = list(dict.fromkeys(row[1:] for row in grid.row_keys))
    if len(grid.spec.rows) > 1 and 1 < len(firsts) <= len(PALETTE):
        return {row: RowStyle(PALETTE[firsts.index(row[0])], MARKERS[rests.index(row[1:]) % len(MARKERS)],
                              LINESTYLES[rests.index(row[1:]) % len(LINESTYLES)]) for row in grid.row_keys}
    return {row: RowStyle(PALETTE[i % len(PALETTE)], MARKERS[i // len(PALETTE) % len(MARKERS)],
                          LINESTYLES[i // len(PALETTE) % len(LINESTYLES)]) for i, row in enumerate(grid.row_keys)}


def plot_metric_vs_batch_size(grid: Grid, interval: str = STD) -> Figure:
    """The table as lines: metric vs the column key (log2 axis for positive numbers), one line per row.

    Error bars are the cells' ``interval`` (none for n=1), named in the title.

    Args:
        grid: the aggregated table.
        interval: one of :data:`~mbn.compare.stats.INTERVALS` (default the sample std over the repeats).
    """
    spec = grid.spec
    scale = metric_scale(spec.metric)
    positions, numeric = _column_positions(grid)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    styles = row_styles(grid)
    for row in grid.row_keys:
        cells = [grid.cell(row, col) for col in grid.col_keys if grid.cell(row, col).n]
        if not cells:
            continue
        bounds = [spread_interval(c.values, interval) for c in cells]
        below = [(c.mean - b.low) * scale if b else 0.0 for c, b in zip(cells, bounds)]
        above = [(b.high - c.mean) * scale if b else 0.0 for c, b in zip(cells, bounds)]
        _draw_row(ax, [positions[c.col] for c in cells], [c.mean * scale for c in cells], [below, above],
                  [grid.col_keys.index(c.col) for c in cells], styles[row], row_label(row))
    _column_axis(ax, grid, positions, numeric)
    ax.set_ylabel(metric_label(spec.metric))
    if interval == STD:
        ax.set_title(f"{spec.metric} vs {_cols_name(grid)} (mean ± std over {spec.over})")
    else:  # the interval's name is long: on its own line
        ax.set_title(f"{spec.metric} vs {_cols_name(grid)}\n(mean, error bars: {interval_label(interval, spec.over)})",
                     fontsize="medium")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        _row_legend(ax, grid)
    return fig


def plot_differences(table: DifferenceTable) -> Figure | None:
    """Each compared row's difference to its baseline vs the column key, with the t intervals, zero marked.

    Points without an interval (fewer than two seeds) are drawn hollow. Rows are shifted slightly
    sideways so the intervals of one column do not hide each other.

    Args:
        table: the differences.

    Returns:
        The figure, or None when no difference could be computed.
    """
    grid = table.grid
    spec = grid.spec
    scale = metric_scale(spec.metric)
    positions, numeric = _column_positions(grid)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    styles = row_styles(grid)
    rows = list(table.baselines)
    plotted = False
    for index, row in enumerate(rows):
        diffs = [table.differences[(row, col)] for col in grid.col_keys
                 if table.differences[(row, col)].mean_difference is not None]
        if not diffs:
            continue
        shift = (index - (len(rows) - 1) / 2) * 0.04
        xs = [positions[d.col] * 2 ** shift if numeric else positions[d.col] + shift for d in diffs]
        ys = [d.mean_difference * scale for d in diffs]
        below = [(d.mean_difference - d.test.difference.low) * scale if d.test else 0.0 for d in diffs]
        above = [(d.test.difference.high - d.mean_difference) * scale if d.test else 0.0 for d in diffs]
        # one shared baseline: the row names the line; baselines per row (bn per model): name both
        label = (row_label(row) if len(set(table.baselines.values())) == 1
                 else f"{row_label(row)} − {row_label(table.baselines[row])}")
        _draw_row(ax, xs, ys, [below, above], [grid.col_keys.index(d.col) for d in diffs], styles[row], label)
        hollow = [(x, y) for x, y, d in zip(xs, ys, diffs) if d.test is None]
        if hollow:
            ax.plot(*zip(*hollow), linestyle="none", marker=styles[row].marker, markerfacecolor="white", color=styles[row].color)
        plotted = True
    if not plotted:
        return None
    ax.axhline(0.0, color="black", linewidth=0.9, zorder=0)
    _column_axis(ax, grid, positions, numeric)
    units = "points" if is_fraction_metric(spec.metric) else spec.metric
    ax.set_ylabel(f"{difference_title(table)} ({units})")
    ax.set_title(f"{spec.metric}: {difference_title(table)} vs {_cols_name(grid)}\n"
                 f"(mean difference, error bars: {CONFIDENCE:.0%} t CI, paired by {spec.over} or Welch)",
                 fontsize="medium")
    ax.grid(True, alpha=0.3)
    _row_legend(ax, grid)
    return fig


def plot_curves(runset: RunSet, grid: Grid, col: Any, metric: str = DEFAULT_CURVE_METRIC) -> Figure | None:
    """A history metric vs epoch for the runs of one column (the paper's Fig. 5), one line per row.

    Lines are the mean over the cell's runs, the band their std.

    Args:
        runset: the runs (their ``history``).
        grid: the aggregated table; its cells say which runs belong to which row.
        col: the column value (batch size) to plot.
        metric: history key to plot (``test_acc1``, ``val_acc1``, ``train_loss``, ...).

    Returns:
        The figure, or None when no run of that column has ``metric`` in its history.
    """
    history = runset.history
    if metric not in history.columns or col not in grid.col_keys:
        return None
    scale = 100.0 if is_fraction_metric(metric) else 1.0
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    styles = row_styles(grid)
    plotted = False
    for row in grid.row_keys:
        rows = history[history["run_id"].isin(grid.cell(row, col).run_ids)][["epoch", metric]].dropna()
        if rows.empty:
            continue
        stats = rows.astype(float).groupby("epoch")[metric].agg(["mean", "std", "count"])
        mean, std = stats["mean"] * scale, stats["std"].fillna(0.0) * scale
        ax.plot(stats.index, mean, marker=styles[row].marker, markersize=3, linestyle=styles[row].linestyle, color=styles[row].color,
                label=f"{row_label(row)} (n={grid.cell(row, col).n})")
        # Arrays, not Series: matplotlib 3.7.0 (the floor) cannot mask a pandas 2 Series here.
        ax.fill_between(stats.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=styles[row].color, alpha=0.2, linewidth=0)
        plotted = True
    if not plotted:
        return None
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric} vs epoch at {short_key(grid.spec.cols)}={col} (mean ± std over {grid.spec.over})")
    ax.grid(True, alpha=0.3)
    _row_legend(ax, grid)
    return fig


def plot_mbn_schedule(runset: RunSet, grid: Grid) -> Figure | None:
    """MBN's momentum parameters lam (training) and tau (inference) vs epoch, one line per batch size.

    Args:
        runset: the runs (their ``history`` with ``lam``/``tau`` columns, null for non-MBN runs).
        grid: the aggregated table; only its runs are plotted.

    Returns:
        The figure, or None when no run logged lam or tau.
    """
    history = runset.history
    keys = [k for k in ("lam", "tau") if k in history.columns and history[k].notna().any()]
    if not keys:
        return None
    fig = Figure(figsize=(FIGSIZE[0] * 1.6, FIGSIZE[1]), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    lines: list[tuple[str, pd.DataFrame, tuple]] = []
    for row in grid.row_keys:
        for col in grid.col_keys:
            rows = history[history["run_id"].isin(grid.cell(row, col).run_ids)]
            if rows[keys].notna().any().any():
                lines.append((f"{short_key(grid.spec.cols)}={col}", rows, row))
    several_rows = len({row for _, _, row in lines}) > 1
    for ax, key in zip(axes, keys):
        for index, (label, rows, row) in enumerate(lines):
            values = rows[["epoch", key]].dropna().astype(float).groupby("epoch")[key].mean()
            if values.empty:
                continue
            text = f"{row_label(row)}, {label}" if several_rows else label
            # Sequential colors: the lines are ordered by batch size.
            color = colormaps["viridis"](0.85 * index / max(len(lines) - 1, 1))
            ax.plot(values.index, values.to_numpy(), marker="o", markersize=3, color=color, label=text)
        symbol = {"lam": "λ (lam)", "tau": "τ (tau)"}[key]
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{symbol}, dimensionless")
        ax.set_title(f"MBN {symbol} vs epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return fig


def _draw_row(ax: Any, xs: list[float], ys: list[float], yerr: list[list[float]], columns: list[int], style: RowStyle,
              label: str) -> None:
    """One row's points with their error bars, joined by its line between neighbouring columns and a thin
    dotted one across columns where the row has no run: a line through an unmeasured column would read
    as a measurement there (a peer run at m = 2 and 32 only, beside norms run at every m)."""
    ax.errorbar(xs, ys, yerr=yerr, marker=style.marker, linestyle="none", capsize=3, color=style.color)
    # The legend's entry is an empty line of the row's whole style: an error bar's entry shows no line style,
    # and line style is what tells apart rows of one color (one norm at several m).
    ax.plot([], [], marker=style.marker, linestyle=style.linestyle, color=style.color, label=label)
    for (x0, y0, col0), (x1, y1, col1) in pairwise(zip(xs, ys, columns)):
        adjacent = col1 == col0 + 1
        ax.plot([x0, x1], [y0, y1], color=style.color, linestyle=style.linestyle if adjacent else ":",
                linewidth=1.5 if adjacent else 1.0)


def _row_legend(ax: Any, grid: Grid) -> None:
    # Outside the axes, on the right: with the nine norms of a full study a legend inside hides points.
    ax.legend(title=" / ".join(short_key(k) for k in grid.spec.rows), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)


def _column_positions(grid: Grid) -> tuple[dict[Any, float], bool]:
    """x position of each column: the value itself on a log2 axis when all are positive numbers, else its index."""
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in grid.col_keys)
    return {col: (col if numeric else i) for i, col in enumerate(grid.col_keys)}, numeric


def _column_axis(ax: Any, grid: Grid, positions: dict[Any, float], numeric: bool) -> None:
    if numeric:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(FixedLocator(list(positions.values())))
    ax.set_xticklabels([str(c) for c in grid.col_keys])
    ax.set_xlabel(f"{_cols_name(grid)} (log2 scale)" if numeric else _cols_name(grid))


def _cols_name(grid: Grid) -> str:
    return "per-device batch size m" if grid.spec.cols == "data.batch_size" else grid.spec.cols


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """The figure encoded as ``png`` or ``svg`` (no timestamp in SVG, so reruns give identical files)."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


def save_figure(fig: Figure, directory: str | os.PathLike, stem: str) -> dict[str, bytes]:
    """Write ``stem.png`` and ``stem.svg`` into ``directory`` (atomically).

    Returns:
        ``{"png": ..., "svg": ...}``: the written bytes (the report embeds the PNG without rendering twice).
    """
    encoded = {}
    for fmt in ("png", "svg"):
        data = encoded[fmt] = figure_bytes(fig, fmt)
        atomic_write(Path(directory) / f"{stem}.{fmt}", lambda f, data=data: f.write(data))
    return encoded
