"""Render a :class:`~mbn.compare.aggregate.Grid` as plain text, Markdown, CSV, LaTeX or an HTML fragment.

Cells read ``mean ± std (n)``; accuracies are shown in percent. The best mean per column is marked
(bold, or ``*`` in plain text) and a cell with fewer repeats than the fullest cell gets a dagger.
"""

from __future__ import annotations

import html
from typing import Any, Callable

from mbn.compare.aggregate import Cell, Grid
from mbn.compare.problems import short_key

FORMATS = ("text", "markdown", "csv", "latex", "html")
FILE_SUFFIXES = {"text": "txt", "markdown": "md", "csv": "csv", "latex": "tex", "html": "html"}
EMPTY = "—"
VALUE_CLASS = ' class="value"'


def is_fraction_metric(metric: str) -> bool:
    """Accuracies are stored as fractions in [0, 1] and shown in percent."""
    return "acc" in metric


def metric_label(metric: str) -> str:
    """``best_val_acc1`` -> ``best_val_acc1 (%)``."""
    return f"{metric} (%)" if is_fraction_metric(metric) else metric


def format_table(grid: Grid, fmt: str = "text", decimals: int = 2) -> str:
    """The table in one of :data:`FORMATS`.

    Args:
        grid: the aggregated table.
        fmt: ``text`` | ``markdown`` | ``csv`` | ``latex`` | ``html`` (a ``<table>`` fragment).
        decimals: digits after the point for mean and std.
    """
    renderers: dict[str, Callable[[Grid, int], str]] = {
        "text": _text, "markdown": _markdown, "csv": _csv, "latex": _latex, "html": _html,
    }
    if fmt not in renderers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return renderers[fmt](grid, decimals)


def caption(grid: Grid, best_mark: str = "in bold") -> str:
    """One-line explanation of the cells and marks.

    Args:
        grid: the aggregated table.
        best_mark: how the best cell of a column is marked (``"in bold"``, ``"with *"``).
    """
    spec = grid.spec
    best = "lowest" if grid.lower_is_better else "highest"
    return (f"{metric_label(spec.metric)}: mean ± sample std over {spec.over} (n); "
            f"best ({best}) mean per column {best_mark}; † = fewer runs than the fullest cell (n={grid.max_n}).")


def cell_text(cell: Cell, grid: Grid, decimals: int = 2, pm: str = "±") -> str:
    """``"81.23 ± 0.45 (3)"``; no std for n=1; :data:`EMPTY` for an empty cell."""
    if cell.n == 0:
        return EMPTY
    scale = 100.0 if is_fraction_metric(grid.spec.metric) else 1.0
    text = f"{cell.mean * scale:.{decimals}f}"
    if cell.std is not None:
        text += f" {pm} {cell.std * scale:.{decimals}f}"
    return f"{text} ({cell.n})"


def column_label(grid: Grid, col: Any) -> str:
    return f"{short_key(grid.spec.cols)}={col}"


def _header(grid: Grid) -> list[str]:
    return [short_key(key) for key in grid.spec.rows] + [column_label(grid, col) for col in grid.col_keys]


def _body(grid: Grid, decimals: int, decorate: Callable[[str, Cell], str],
          label: Callable[[Any], str] = str) -> list[list[str]]:
    """Table rows as text: the row labels, then each cell's text passed through ``decorate``."""
    return [[label(v) for v in row]
            + [decorate(cell_text(grid.cell(row, col), grid, decimals), grid.cell(row, col)) for col in grid.col_keys]
            for row in grid.row_keys]


def _text(grid: Grid, decimals: int) -> str:
    # Marks go in a fixed-width slot after the number so the numbers stay right-aligned.
    def decorate(text: str, cell: Cell) -> str:
        return text + ("*" if cell.best else " ") + ("†" if cell.n and grid.is_incomplete(cell) else " ")

    rows = [[h + "  " if i >= len(grid.spec.rows) else h for i, h in enumerate(_header(grid))]]
    rows += _body(grid, decimals, decorate)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    n_labels = len(grid.spec.rows)
    lines = []
    for index, row in enumerate(rows):
        cells = [c.ljust(w) if i < n_labels else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join([caption(grid, "with *"), *lines]) + "\n"


def _markdown(grid: Grid, decimals: int) -> str:
    def decorate(text: str, cell: Cell) -> str:
        text = f"**{text}**" if cell.best else text
        return text + (" †" if cell.n and grid.is_incomplete(cell) else "")

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = _header(grid)
    n_labels = len(grid.spec.rows)
    lines = ["| " + " | ".join(escape(h) for h in header) + " |",
             "|" + "|".join(":---" if i < n_labels else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in _body(grid, decimals, decorate)]
    return "\n".join(lines) + f"\n\n{caption(grid)}\n"


def _latex(grid: Grid, decimals: int) -> str:
    def decorate(text: str, cell: Cell) -> str:
        text = text.replace(EMPTY, "--")
        text = f"\\textbf{{{text}}}" if cell.best else text
        return text + ("$^\\dagger$" if cell.n and grid.is_incomplete(cell) else "")

    n_labels = len(grid.spec.rows)
    header = [_latex_escape(h) for h in _header(grid)]
    body = _body(grid, decimals, lambda text, cell: decorate(text.replace(" ± ", " $\\pm$ "), cell), label=lambda v: _latex_escape(str(v)))
    lines = [
        "% " + caption(grid),
        "\\begin{tabular}{" + "l" * n_labels + "c" * len(grid.col_keys) + "}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
        *(" & ".join(row) + " \\\\" for row in body),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _csv(grid: Grid, decimals: int) -> str:
    frame = grid.to_frame()
    if is_fraction_metric(grid.spec.metric):
        frame = frame.rename(columns={"mean": "mean_pct", "std": "std_pct"})
        frame[["mean_pct", "std_pct"]] = frame[["mean_pct", "std_pct"]].astype(float) * 100.0
    frame.insert(len(grid.spec.rows) + 1, "metric", grid.spec.metric)
    return frame.to_csv(index=False, float_format="%.6g")


def _html(grid: Grid, decimals: int) -> str:
    parts = ['<table class="results">', f"<caption>{html.escape(caption(grid))}</caption>", "<thead><tr>"]
    n_labels = len(grid.spec.rows)
    parts += [f'<th scope="col"{"" if i < n_labels else VALUE_CLASS}>{html.escape(h)}</th>'
              for i, h in enumerate(_header(grid))]
    parts.append("</tr></thead><tbody>")
    for row in grid.row_keys:
        parts.append("<tr>" + "".join(f'<th scope="row">{html.escape(str(v))}</th>' for v in row))
        for col in grid.col_keys:
            cell = grid.cell(row, col)
            text = html.escape(cell_text(cell, grid, decimals))
            classes = []
            if cell.best:
                classes.append("best")
                text = f"<strong>{text}</strong>"
            if cell.n and grid.is_incomplete(cell):
                classes.append("incomplete")
                missing = ", ".join(str(v) for v in cell.missing_over)
                text += f'<sup title="fewer runs than the fullest cell; missing {html.escape(grid.spec.over)}: {html.escape(missing)}">†</sup>'
            elif cell.n:
                text += "<sup></sup>"  # keeps the numbers of a column aligned with the daggered ones
            if cell.n == 0:
                classes.append("empty")
            class_attr = f' class="{" ".join(classes)}"' if classes else ""
            parts.append(f"<td{class_attr}>{text}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts) + "\n"


def _latex_escape(text: str) -> str:
    replacements = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
    return "".join(replacements.get(ch, ch) for ch in text)
