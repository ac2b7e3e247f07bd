"""Render a :class:`~mbn.compare.aggregate.Grid` as plain text, Markdown, CSV, LaTeX or an HTML fragment.

Cells read ``mean ± std (n)`` (or ``mean ± t-interval half-width (n)``, ``mean [bootstrap low, high] (n)``,
see :data:`~mbn.compare.stats.INTERVALS`); accuracies are shown in percent. The best mean per column is
marked (bold, or ``*`` in plain text) and a cell with fewer repeats than the fullest cell gets a dagger.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import pandas as pd

from mbn.compare.aggregate import Cell, Grid
from mbn.compare.problems import short_key
from mbn.compare.stats import BOOTSTRAP, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI95, INTERVALS, MIN_SEEDS, STD, \
    spread_interval

FORMATS = ("text", "markdown", "csv", "latex", "html")
FILE_SUFFIXES = {"text": "txt", "markdown": "md", "csv": "csv", "latex": "tex", "html": "html"}
EMPTY = "—"
CSV_FLOAT_FORMAT = "%.6g"
VALUE_CLASS = ' class="value"'


def is_fraction_metric(metric: str) -> bool:
    """Accuracies are stored as fractions in [0, 1] and shown in percent."""
    return "acc" in metric


def metric_label(metric: str) -> str:
    """``best_val_acc1`` -> ``best_val_acc1 (%)``."""
    return f"{metric} (%)" if is_fraction_metric(metric) else metric


def metric_scale(metric: str) -> float:
    """Factor from stored to shown units: 100 for accuracies (fractions shown in percent), else 1."""
    return 100.0 if is_fraction_metric(metric) else 1.0


def interval_label(interval: str, over: str) -> str:
    """What an interval of :data:`~mbn.compare.stats.INTERVALS` is, for captions and plot titles.

    Args:
        interval: ``std`` | ``ci95`` | ``bootstrap``.
        over: the repeat key (``seed``).
    """
    labels = {
        STD: f"sample std over {over}",
        CI95: f"95% t confidence interval of the mean over {over}",
        BOOTSTRAP: f"95% percentile-bootstrap interval of the mean over {over} "
                   f"({BOOTSTRAP_RESAMPLES} resamples, numpy seed {BOOTSTRAP_SEED})",
    }
    if interval not in labels:
        raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
    return labels[interval]


def format_table(grid: Grid, fmt: str = "text", decimals: int = 2, interval: str = STD) -> str:
    """The table in one of :data:`FORMATS`.

    Args:
        grid: the aggregated table.
        fmt: ``text`` | ``markdown`` | ``csv`` | ``latex`` | ``html`` (a ``<table>`` fragment).
        decimals: digits after the point for mean and std.
        interval: what each cell shows around its mean, one of :data:`~mbn.compare.stats.INTERVALS`.
    """
    renderers: dict[str, Callable[[Grid, int, str], str]] = {
        "text": _text, "markdown": _markdown, "csv": _csv, "latex": _latex, "html": _html,
    }
    if fmt not in renderers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    interval_label(interval, grid.spec.over)  # rejects an unknown interval before rendering
    return renderers[fmt](grid, decimals, interval)


def caption(grid: Grid, best_mark: str = "in bold", interval: str = STD) -> str:
    """One-line explanation of the cells and marks.

    Args:
        grid: the aggregated table.
        best_mark: how the best cell of a column is marked (``"in bold"``, ``"with *"``).
        interval: what the cells show around their mean.
    """
    spec = grid.spec
    best = "lowest" if grid.lower_is_better else "highest"
    if interval == STD:
        cells = f"mean ± {interval_label(interval, spec.over)} (n)"
    elif interval == CI95:
        cells = f"mean ± half-width of the {interval_label(interval, spec.over)} (n)"
    else:
        cells = f"mean [{interval_label(interval, spec.over)}] (n)"
    single = any(cell.n == 1 for cell in grid.cells.values())
    return (f"{metric_label(spec.metric)}: {cells}; "
            + (f"cells with n=1 show no interval (intervals need >= {MIN_SEEDS} seeds); " if single else "")
            + f"best ({best}) mean per column {best_mark}; † = {_fewer_runs(grid)}.")


def _fewer_runs(grid: Grid) -> str:
    # A design may give some columns more seeds than others: a cell is compared with its own column.
    fullest = {col: grid.column_max_n(col) for col in grid.col_keys}
    if len(set(fullest.values())) <= 1:
        return f"fewer runs than the fullest cell (n={grid.max_n})"
    col = short_key(grid.spec.cols)
    return "fewer runs than the fullest cell of its column (" + ", ".join(f"n={n} at {col}={c}" for c, n in fullest.items()) + ")"


def cell_text(cell: Cell, grid: Grid, decimals: int = 2, pm: str = "±", interval: str = STD) -> str:
    """``"81.23 ± 0.45 (3)"`` (``"81.23 [80.81, 81.60] (3)"`` for the bootstrap); no interval for n=1;
    :data:`EMPTY` for an empty cell."""
    if cell.n == 0:
        return EMPTY
    scale = metric_scale(grid.spec.metric)
    text = f"{cell.mean * scale:.{decimals}f}"
    bounds = spread_interval(cell.values, interval)
    if bounds is None:
        pass
    elif interval == BOOTSTRAP:  # asymmetric: both ends
        text += f" [{bounds.low * scale:.{decimals}f}, {bounds.high * scale:.{decimals}f}]"
    else:  # symmetric; the std straight from the cell so the text is exactly today's
        half = cell.std if interval == STD else bounds.high - bounds.estimate
        text += f" {pm} {half * scale:.{decimals}f}"
    return f"{text} ({cell.n})"


def column_label(grid: Grid, col: Any) -> str:
    return f"{short_key(grid.spec.cols)}={col}"


def _header(grid: Grid) -> list[str]:
    return [short_key(key) for key in grid.spec.rows] + [column_label(grid, col) for col in grid.col_keys]


def cells_frame(grid: Grid, interval: str = STD) -> pd.DataFrame:
    """:meth:`Grid.to_frame` in shown units (``mean_pct``, ``std_pct`` for accuracies), with the metric
    name, and for ``ci95``/``bootstrap`` the interval's name and its ends (``low_pct``, ``high_pct``).

    Args:
        grid: the aggregated table.
        interval: the interval shown in the cells.
    """
    frame = grid.to_frame()
    suffix = "_pct" if is_fraction_metric(grid.spec.metric) else ""
    scale = metric_scale(grid.spec.metric)
    frame = frame.rename(columns={"mean": f"mean{suffix}", "std": f"std{suffix}"})
    frame[[f"mean{suffix}", f"std{suffix}"]] = frame[[f"mean{suffix}", f"std{suffix}"]].astype(float) * scale
    frame.insert(len(grid.spec.rows) + 1, "metric", grid.spec.metric)
    if interval != STD:
        bounds = [spread_interval(grid.cell(row, col).values, interval)
                  for row in grid.row_keys for col in grid.col_keys]
        position = frame.columns.get_loc(f"std{suffix}") + 1
        frame.insert(position, "interval", interval)
        frame.insert(position + 1, f"low{suffix}", [b.low * scale if b else None for b in bounds])
        frame.insert(position + 2, f"high{suffix}", [b.high * scale if b else None for b in bounds])
    return frame


def _body(grid: Grid, decimals: int, interval: str, decorate: Callable[[str, Cell], str],
          label: Callable[[Any], str] = str) -> list[list[str]]:
    """Table rows as text: the row labels, then each cell's text passed through ``decorate``."""
    return [[label(v) for v in row]
            + [decorate(cell_text(grid.cell(row, col), grid, decimals, interval=interval), grid.cell(row, col))
               for col in grid.col_keys]
            for row in grid.row_keys]


def _text(grid: Grid, decimals: int, interval: str) -> str:
    # Marks go in a fixed-width slot after the number so the numbers stay right-aligned.
    def decorate(text: str, cell: Cell) -> str:
        return text + ("*" if cell.best else " ") + ("†" if cell.n and grid.is_incomplete(cell) else " ")

    rows = [[h + "  " if i >= len(grid.spec.rows) else h for i, h in enumerate(_header(grid))]]
    rows += _body(grid, decimals, interval, decorate)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    n_labels = len(grid.spec.rows)
    lines = []
    for index, row in enumerate(rows):
        cells = [c.ljust(w) if i < n_labels else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join([caption(grid, "with *", interval), *lines]) + "\n"


def _markdown(grid: Grid, decimals: int, interval: str) -> str:
    def decorate(text: str, cell: Cell) -> str:
        text = f"**{text}**" if cell.best else text
        return text + (" †" if cell.n and grid.is_incomplete(cell) else "")

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = _header(grid)
    n_labels = len(grid.spec.rows)
    lines = ["| " + " | ".join(escape(h) for h in header) + " |",
             "|" + "|".join(":---" if i < n_labels else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in _body(grid, decimals, interval, decorate)]
    return "\n".join(lines) + f"\n\n{caption(grid, interval=interval)}\n"


def _latex(grid: Grid, decimals: int, interval: str) -> str:
    def decorate(text: str, cell: Cell) -> str:
        text = text.replace(EMPTY, "--")
        text = f"\\textbf{{{text}}}" if cell.best else text
        return text + ("$^\\dagger$" if cell.n and grid.is_incomplete(cell) else "")

    n_labels = len(grid.spec.rows)
    header = [latex_escape(h) for h in _header(grid)]
    body = _body(grid, decimals, interval, lambda text, cell: decorate(text.replace(" ± ", " $\\pm$ "), cell),
                 label=lambda v: latex_escape(str(v)))
    lines = [
        "% " + caption(grid, interval=interval),
        "\\begin{tabular}{" + "l" * n_labels + "c" * len(grid.col_keys) + "}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
        *(" & ".join(row) + " \\\\" for row in body),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _csv(grid: Grid, decimals: int, interval: str) -> str:
    return cells_frame(grid, interval).to_csv(index=False, float_format=CSV_FLOAT_FORMAT)


def _html(grid: Grid, decimals: int, interval: str) -> str:
    parts = ['<table class="results">', f"<caption>{html.escape(caption(grid, interval=interval))}</caption>",
             "<thead><tr>"]
    n_labels = len(grid.spec.rows)
    parts += [f'<th scope="col"{"" if i < n_labels else VALUE_CLASS}>{html.escape(h)}</th>'
              for i, h in enumerate(_header(grid))]
    parts.append("</tr></thead><tbody>")
    for row in grid.row_keys:
        parts.append("<tr>" + "".join(f'<th scope="row">{html.escape(str(v))}</th>' for v in row))
        for col in grid.col_keys:
            cell = grid.cell(row, col)
            text = html.escape(cell_text(cell, grid, decimals, interval=interval))
            classes = []
            if cell.best:
                classes.append("best")
                text = f"<strong>{text}</strong>"
            if cell.n and grid.is_incomplete(cell):
                classes.append("incomplete")
                missing = ", ".join(str(v) for v in cell.missing_over)
                text += f'<sup title="fewer runs than the fullest cell of its column; missing {html.escape(grid.spec.over)}: {html.escape(missing)}">†</sup>'
            elif cell.n:
                text += "<sup></sup>"  # keeps the numbers of a column aligned with the daggered ones
            if cell.n == 0:
                classes.append("empty")
            class_attr = f' class="{" ".join(classes)}"' if classes else ""
            parts.append(f"<td{class_attr}>{text}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in table text."""
    replacements = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
    return "".join(replacements.get(ch, ch) for ch in text)
