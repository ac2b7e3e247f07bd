"""Differences to a baseline row: for every other row and column, how much better or worse, and how sure.

For each (row, column) cell and the baseline's cell of the same column:

- the mean difference (row − baseline) in shown units (points for accuracies) with its 95% t interval
  and a two-sided p-value: a paired t-test when both cells have the same seeds, each once (the same seed
  means the same data order and initialization, so the paired difference removes that variance), else
  Welch's unpaired t-test, with the reason;
- the p-values of one row's columns Holm-Bonferroni adjusted (one family per row-vs-baseline comparison);
- the probability of improvement, P(a run of the row beats a run of the baseline) over all run pairs;
- the seeds per cell a t-test of the same design would need to detect ``detect`` points with 80% power
  at the 5% level, from the observed seed spread.

Intervals, p-values and the rest need at least two seeds per cell; with fewer only the mean
difference is given, and the verdict says why.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from mbn.compare.aggregate import Cell, Grid, sort_key
from mbn.compare.problems import row_label, short_key
from mbn.compare.stats import (
    ALPHA, CONFIDENCE, MAX_SEEDS, MIN_SEEDS, PAIRED, POWER, DifferenceTest, holm_adjust, paired_t_test,
    probability_of_improvement, seeds_needed, welch_t_test,
)
from mbn.compare.table import CSV_FLOAT_FORMAT, EMPTY, FORMATS, VALUE_CLASS, column_label, is_fraction_metric, \
    latex_escape, metric_label, metric_scale

DEFAULT_DETECT = 1.0


class UnknownBaseline(ValueError):
    """The ``--baseline`` value names no row of the table (or is ambiguous)."""


@dataclass(frozen=True)
class Difference:
    """One row's cell against the baseline's cell of the same column.

    Attributes:
        row: the compared row.
        baseline: its baseline row.
        col: the column value.
        n: runs in the row's cell.
        n_baseline: runs in the baseline's cell.
        mean_difference: mean(row) − mean(baseline) in metric units; None when a cell is empty.
        test: the paired or Welch t-test; None with fewer than two seeds in a cell.
        unpaired_reason: why the cells could not be paired by seed ("" when paired or not tested).
        p_holm: the test's p-value, Holm-adjusted over the tested columns of this row.
        prob_improvement: P(a run of the row beats a run of the baseline), see
            :func:`~mbn.compare.stats.probability_of_improvement`; None when not tested.
        seeds_needed: seeds per cell to detect the table's ``detect`` difference; None when not tested or
            more than :data:`~mbn.compare.stats.MAX_SEEDS`.
    """

    row: tuple
    baseline: tuple
    col: Any
    n: int
    n_baseline: int
    mean_difference: float | None
    test: DifferenceTest | None
    unpaired_reason: str
    p_holm: float | None
    prob_improvement: float | None
    seeds_needed: int | None

    @property
    def significant(self) -> bool:
        """Holm-adjusted p below :data:`~mbn.compare.stats.ALPHA`."""
        return self.p_holm is not None and self.p_holm < ALPHA


@dataclass
class DifferenceTable:
    """Every non-baseline row against its baseline row, column by column.

    Attributes:
        grid: the aggregated table the differences come from.
        baseline: the ``--baseline`` value as given.
        baselines: compared row -> its baseline row, in the grid's row order.
        detect: the difference the seeds-needed column is computed for, in shown units (points).
        differences: ``(row, col) -> Difference`` for every compared row and every column.
    """

    grid: Grid
    baseline: str
    baselines: dict[tuple, tuple]
    detect: float
    differences: dict[tuple[tuple, Any], Difference]

    @property
    def baseline_label(self) -> str:
        """``"bn"``, or ``"bn / resnet18"`` when one full row is the baseline of every other row."""
        rows = set(self.baselines.values())
        return row_label(next(iter(rows))) if len(rows) == 1 else self.baseline

    @property
    def unpaired_notes(self) -> list[str]:
        """One line per tested comparison that fell back to Welch, naming the cell and why."""
        return [f"{cell_name(self.grid, d.row, d.col)}: Welch (unpaired), {d.unpaired_reason}"
                for d in self.differences.values() if d.test is not None and d.unpaired_reason]

    def verdict(self, difference: Difference) -> str:
        """``significant``; ``not significant; detecting 1.00 points needs 12 seeds per cell``; or why untested."""
        if difference.mean_difference is None:
            empty = [row_label(row) for row, n in ((difference.row, difference.n),
                                                   (difference.baseline, difference.n_baseline)) if not n]
            return f"no usable run in {' and '.join(empty)}"
        if difference.test is None:
            return f"intervals need >= {MIN_SEEDS} seeds per cell"
        if difference.significant:
            return "significant"
        needed = (f"{difference.seeds_needed} seeds per cell" if difference.seeds_needed is not None
                  else f"more than {MAX_SEEDS} seeds per cell")
        return f"not significant; detecting {_amount(self.detect)} {self.units} needs {needed}"

    @property
    def units(self) -> str:
        """What the differences are in: accuracy ``points``, else the metric's own units."""
        return "points" if is_fraction_metric(self.grid.spec.metric) else f"{self.grid.spec.metric} units"

    def to_frame(self) -> pd.DataFrame:
        """Long table, one row per (compared row, column), in shown units (``_pct`` for accuracies):
        the keys, the baseline, n, test, difference and interval, df, p, Holm p, significant,
        probability of improvement, spread, detect, seeds needed and the verdict."""
        spec = self.grid.spec
        suffix = "_pct" if is_fraction_metric(spec.metric) else ""
        scale = metric_scale(spec.metric)
        records = []
        for difference in self.differences.values():
            test = difference.test
            records.append({
                **dict(zip(spec.rows, difference.row)),
                spec.cols: difference.col,
                "metric": spec.metric,
                "baseline": row_label(difference.baseline),
                "n": difference.n,
                "n_baseline": difference.n_baseline,
                "test": test.method if test else None,
                "unpaired_reason": difference.unpaired_reason or None,
                f"diff{suffix}": _scaled(difference.mean_difference, scale),
                f"diff_ci_low{suffix}": _scaled(test.difference.low, scale) if test else None,
                f"diff_ci_high{suffix}": _scaled(test.difference.high, scale) if test else None,
                "df": test.df if test else None,
                "p": test.p_value if test else None,
                "p_holm": difference.p_holm,
                "significant": difference.significant if test else None,
                "prob_improvement": difference.prob_improvement,
                f"spread{suffix}": _scaled(test.spread, scale) if test else None,
                f"detect{suffix}": self.detect,
                "seeds_needed": difference.seeds_needed,
                "verdict": self.verdict(difference),
            })
        frame = pd.DataFrame(records)
        for column in ("n", "n_baseline", "seeds_needed"):
            if column in frame:
                frame[column] = frame[column].astype("Int64")
        return frame


def resolve_baselines(grid: Grid, baseline: str) -> dict[tuple, tuple]:
    """Which row each other row is compared with.

    ``baseline`` is either a full row label (``bn``, or ``bn / resnet18`` / ``bn,resnet18`` for several
    row keys), then that row is the baseline of every other row; or one value of one row key (``bn``),
    then each row is compared with the row that has that value and the same other keys (``mbn /
    resnet18`` with ``bn / resnet18``); rows without such a partner are left out.

    Args:
        grid: the aggregated table.
        baseline: the ``--baseline`` value.

    Raises:
        UnknownBaseline: it matches no row, or values of several row keys.
    """
    parts = tuple(part.strip() for part in re.split(r"[/,]", baseline))
    labels = {row: tuple(str(v) for v in row) for row in grid.row_keys}
    full = [row for row, label in labels.items() if label == parts]
    if full:
        return {row: full[0] for row in grid.row_keys if row != full[0]}
    if len(parts) == 1:
        positions = sorted({i for label in labels.values() for i, v in enumerate(label) if v == parts[0]})
        if len(positions) > 1:
            keys = ", ".join(short_key(grid.spec.rows[i]) for i in positions)
            raise UnknownBaseline(f"--baseline {baseline!r} is a value of several row keys ({keys}); give a full "
                                  f"row label, one of: {_row_list(grid)}")
        if positions:
            position = positions[0]
            pairs = {}
            for row, label in labels.items():
                if label[position] == parts[0]:
                    continue
                partner = next((other for other, other_label in labels.items() if other_label[position] == parts[0]
                                and all(a == b for i, (a, b) in enumerate(zip(label, other_label)) if i != position)),
                               None)
                if partner is not None:
                    pairs[row] = partner
            return pairs
    raise UnknownBaseline(f"--baseline {baseline!r} matches no row; rows: {_row_list(grid)}")


def compute_differences(grid: Grid, baseline: str, detect: float = DEFAULT_DETECT) -> DifferenceTable:
    """Compare every row with its baseline (see :func:`resolve_baselines`) in every column.

    Args:
        grid: the aggregated table.
        baseline: the ``--baseline`` value.
        detect: the difference to power the seeds-needed estimate for, in shown units (points for
            accuracies), > 0.

    Raises:
        UnknownBaseline: ``baseline`` names no row.
        ValueError: ``detect`` is not positive.
    """
    if not detect > 0:
        raise ValueError(f"detect must be > 0, got {detect}")
    baselines = resolve_baselines(grid, baseline)
    higher_is_better = not grid.lower_is_better
    detect_raw = detect / metric_scale(grid.spec.metric)
    differences: dict[tuple[tuple, Any], Difference] = {}
    for row, base in baselines.items():
        tested: dict[Any, tuple[DifferenceTest | None, str]] = {}
        for col in grid.col_keys:
            tested[col] = _test(grid.cell(row, col), grid.cell(base, col), grid)
        cols = [col for col in grid.col_keys if tested[col][0] is not None]
        adjusted = dict(zip(cols, holm_adjust([tested[col][0].p_value for col in cols])))
        for col in grid.col_keys:
            cell, base_cell = grid.cell(row, col), grid.cell(base, col)
            test, reason = tested[col]
            differences[(row, col)] = Difference(
                row=row, baseline=base, col=col, n=cell.n, n_baseline=base_cell.n,
                mean_difference=cell.mean - base_cell.mean if cell.n and base_cell.n else None,
                test=test, unpaired_reason=reason if test else "", p_holm=adjusted.get(col),
                prob_improvement=(probability_of_improvement(cell.values, base_cell.values, higher_is_better)
                                  if test else None),
                seeds_needed=seeds_needed(detect_raw, test.spread, test.method == PAIRED) if test else None,
            )
    return DifferenceTable(grid=grid, baseline=baseline, baselines=baselines, detect=detect,
                           differences=differences)


def pairing_problem(cell: Cell, baseline: Cell, over: str = "seed") -> str:
    """Why two cells cannot be paired by ``over`` (their seeds differ, or one seed has several runs); "" if they can.

    Args:
        cell: the compared row's cell.
        baseline: the baseline's cell of the same column.
        over: the repeat key, for the message.
    """
    for which, c in (("row", cell), ("baseline", baseline)):
        if c.duplicated_over:
            return f"{over} {', '.join(map(str, c.duplicated_over))} has several runs in the {which} cell"
    mine, theirs = set(cell.over_values), set(baseline.over_values)
    if mine != theirs:
        def listed(values: set) -> str:
            return ", ".join(str(v) for v in sorted(values, key=sort_key)) or "none"

        return f"{over}s differ ({row_label(cell.row)}: {listed(mine)}; {row_label(baseline.row)}: {listed(theirs)})"
    return ""


def cell_name(grid: Grid, row: tuple, col: Any) -> str:
    """``"mbn, m=2"``: the compared row and the column of a difference."""
    return f"{row_label(row)}, {column_label(grid, col)}"


def format_differences(table: DifferenceTable, fmt: str = "text", decimals: int = 2) -> str:
    """The difference table in one of :data:`~mbn.compare.table.FORMATS`.

    Args:
        table: the differences.
        fmt: ``text`` | ``markdown`` | ``csv`` (the long :meth:`DifferenceTable.to_frame`) | ``latex`` |
            ``html`` (a ``<table>`` fragment).
        decimals: digits after the point of the differences and their intervals.
    """
    renderers: dict[str, Callable[[DifferenceTable, int], str]] = {
        "text": _text, "markdown": _markdown, "csv": _csv, "latex": _latex, "html": _html,
    }
    if fmt not in renderers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return renderers[fmt](table, decimals)


def title(table: DifferenceTable) -> str:
    """``"difference to bn"``: the heading of the table."""
    return f"difference to {table.baseline_label}"


def caption_lines(table: DifferenceTable) -> list[str]:
    """What the columns of the difference table are, one sentence each."""
    grid = table.grid
    over = grid.spec.over
    better, higher = ("<", "lower") if grid.lower_is_better else (">", "higher")
    base = table.baseline_label
    n_cols = len(grid.col_keys)
    lines = [
        f"{metric_label(grid.spec.metric)}: diff = row − {base} in {table.units} with its {CONFIDENCE:.0%} t "
        f"confidence interval; test = paired t-test by {over} where both cells have the same {over}s, else Welch's "
        f"unpaired t-test.",
        f"p (Holm) = the p-values Holm-Bonferroni adjusted over the tested columns of each row (at most {n_cols}); "
        f"significant: p (Holm) < {ALPHA:g}.",
        f"P({better}{base}) = share of all pairs of runs in which the row's run is {higher} (ties count 1/2).",
        f"seeds needed (where not significant): {over}s per cell for a t-test of the same design to detect "
        f"{_amount(table.detect)} {table.units} with {POWER:.0%} power at the {ALPHA:.0%} level, from the observed "
        f"{over} spread.",
    ]
    if any(d.test is None and d.mean_difference is not None for d in table.differences.values()):
        lines.append(f"Intervals, p-values and P need >= {MIN_SEEDS} {over}s per cell; with fewer only diff is shown.")
    return lines


def caption(table: DifferenceTable) -> str:
    """:func:`caption_lines` as one paragraph."""
    return " ".join(caption_lines(table))


def _header(table: DifferenceTable) -> list[str]:
    better = "<" if table.grid.lower_is_better else ">"
    spec = table.grid.spec
    return ([short_key(k) for k in spec.rows] + [short_key(spec.cols), "diff", f"{CONFIDENCE:.0%} CI", "p",
                                                  "p (Holm)", f"P({better}{table.baseline_label})", "test", "verdict"])


def _shown(table: DifferenceTable) -> list[Difference]:
    """The differences that have a value: a (row, column) without a usable run on either side is a
    note (:func:`_notes`), not a row of dashes (e.g. a norm run at one batch size only)."""
    return [d for d in table.differences.values() if d.mean_difference is not None]


def _body(table: DifferenceTable, decimals: int) -> list[list[str]]:
    scale = metric_scale(table.grid.spec.metric)
    rows = []
    for difference in _shown(table):
        test = difference.test
        diff = f"{difference.mean_difference * scale:+.{decimals}f}"
        interval = (f"[{test.difference.low * scale:+.{decimals}f}, {test.difference.high * scale:+.{decimals}f}]"
                    if test else EMPTY)
        if test is None:
            method = EMPTY
        elif test.method == PAIRED:
            method = f"paired t (n={test.n_x})"
        else:
            method = f"Welch t (n={test.n_x}, {test.n_y})"
        rows.append([str(v) for v in difference.row] + [
            str(difference.col), diff, interval, _p_text(test.p_value) if test else EMPTY,
            _p_text(difference.p_holm) if test else EMPTY,
            f"{difference.prob_improvement:.2f}" if difference.prob_improvement is not None else EMPTY,
            method, table.verdict(difference),
        ])
    return rows


def _notes(table: DifferenceTable) -> list[str]:
    notes = list(table.unpaired_notes)
    left_out = [row for row in table.grid.row_keys if row not in table.baselines and row not in table.baselines.values()]
    if left_out:
        notes.append(f"not compared (no {table.baseline} row with the same other keys): "
                     + "; ".join(row_label(row) for row in left_out))
    empty: dict[tuple[tuple, str], list[str]] = {}
    for difference in table.differences.values():
        if difference.mean_difference is None:
            empty.setdefault((difference.row, table.verdict(difference)), []).append(str(difference.col))
    for (row, verdict), cols in empty.items():
        notes.append(f"{row_label(row)}: nothing to compare at {short_key(table.grid.spec.cols)} = {', '.join(cols)} ({verdict})")
    return notes


def _text(table: DifferenceTable, decimals: int) -> str:
    header = _header(table)
    rows = [header, *_body(table, decimals)]
    n_labels = len(table.grid.spec.rows)
    # left: the labels and the two text columns at the end; right: the numbers
    left = set(range(n_labels)) | {len(header) - 2, len(header) - 1}
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not _shown(table):
        lines.append("(no row to compare)")
    return "\n".join([f"{title(table)} ({table.grid.spec.metric}, row − {table.baseline_label}):", *lines,
                      *_notes(table), *caption_lines(table)]) + "\n"


def _markdown(table: DifferenceTable, decimals: int) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = _header(table)
    n_labels = len(table.grid.spec.rows)
    aligns = [":---" if i < n_labels or i >= len(header) - 2 else "---:" for i in range(len(header))]
    lines = [f"**{escape(title(table))}**", "",
             "| " + " | ".join(escape(h) for h in header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in _body(table, decimals)]
    notes = "".join(f"\n- {escape(note)}" for note in _notes(table))
    return "\n".join(lines) + f"\n\n{escape(caption(table))}\n" + (notes[1:] + "\n" if notes else "")


def _latex(table: DifferenceTable, decimals: int) -> str:
    header = _header(table)
    n_labels = len(table.grid.spec.rows)

    def cell(text: str) -> str:
        return latex_escape(text.replace(EMPTY, "--"))

    lines = [
        f"% {title(table)}: {caption(table)}",
        *(f"% {note}" for note in _notes(table)),
        "\\begin{tabular}{" + "l" * (n_labels + 1) + "r" * 5 + "ll}",
        "\\toprule",
        " & ".join(cell(h) for h in header) + " \\\\",
        "\\midrule",
        *(" & ".join(cell(c) for c in row) + " \\\\" for row in _body(table, decimals)),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _csv(table: DifferenceTable, decimals: int) -> str:
    return table.to_frame().to_csv(index=False, float_format=CSV_FLOAT_FORMAT)


def _html(table: DifferenceTable, decimals: int) -> str:
    header = _header(table)
    n_labels = len(table.grid.spec.rows)
    numeric = range(n_labels + 1, len(header) - 2)
    parts = ['<table class="results differences">', f"<caption>{html.escape(caption(table))}</caption>",
             "<thead><tr>"]
    parts += [f'<th scope="col"{VALUE_CLASS if i in numeric else ""}>{html.escape(h)}</th>'
              for i, h in enumerate(header)]
    parts.append("</tr></thead><tbody>")
    for difference, row in zip(_shown(table), _body(table, decimals)):
        classes = ' class="best"' if difference.significant else ""
        parts.append("<tr>" + "".join(f'<th scope="row">{html.escape(c)}</th>' for c in row[:n_labels])
                     + f"<td>{html.escape(row[n_labels])}</td>"
                     + "".join(f"<td{classes if i == n_labels + 1 else ''}>{html.escape(c)}</td>"
                               for i, c in enumerate(row[n_labels + 1:-2], start=n_labels + 1))
                     + "".join(f'<td class="text">{html.escape(c)}</td>' for c in row[-2:]) + "</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="meta">{html.escape(note)}</p>' for note in _notes(table)]
    return "\n".join(parts) + "\n"


def _test(cell: Cell, baseline: Cell, grid: Grid) -> tuple[DifferenceTest | None, str]:
    """The paired test when the cells pair by seed, else Welch's; with the reason it is not paired."""
    reason = pairing_problem(cell, baseline, grid.spec.over)
    if not reason:
        order = sorted(cell.over_values, key=sort_key)
        mine = dict(zip(cell.over_values, cell.values))
        theirs = dict(zip(baseline.over_values, baseline.values))
        return paired_t_test([mine[v] for v in order], [theirs[v] for v in order]), ""
    return welch_t_test(cell.values, baseline.values), reason


def _amount(value: float) -> str:
    """``1.00``: a difference in the table's precision, for sentences."""
    return f"{value:.2f}"


def _p_text(p: float | None) -> str:
    if p is None:
        return EMPTY
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value * scale


def _row_list(grid: Grid) -> str:
    return ", ".join(row_label(row) for row in grid.row_keys) or "(none)"
