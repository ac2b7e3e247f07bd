"""A self-contained HTML report: one file with inline CSS and base64 images that opens offline."""

from __future__ import annotations

import base64
import html
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mbn
from mbn.compare.aggregate import Grid
from mbn.compare.collect import RunSet, plain
from mbn.compare.configdiff import summarize_config
from mbn.compare.differences import DifferenceTable, format_differences, title as difference_title
from mbn.compare.problems import GridNote, RunProblem, short_key
from mbn.compare.stats import STD
from mbn.compare.table import format_table
from mbn.utils.io import atomic_write

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
.meta { color: #57606a; font-size: 0.92em; margin: 2px 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 0.88em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
thead th { background: #f0f3f6; }
caption { caption-side: bottom; text-align: left; color: #57606a; font-size: 0.88em; padding-top: 6px; }
table.results td { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.results td.best { background: #dafbe1; }
table.results td.incomplete { background: #fff8c5; }
table.results td.best.incomplete { background: linear-gradient(90deg, #dafbe1 70%, #fff8c5); }
table.results td.empty { color: #8c959f; text-align: center; }
table.results th.value { text-align: right; padding-right: 1.4em; }
table.differences td.text { text-align: left; white-space: normal; }
table.results td sup { display: inline-block; width: 0.7em; text-align: left; }
table.list td.dir { word-break: break-all; max-width: 420px; }
table.list td.error { max-width: 380px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 0.85em; color: #fff;
         background: #57606a; white-space: nowrap; }
.badge.completed { background: #1a7f37; } .badge.failed, .badge.unreadable { background: #cf222e; }
.badge.diverged { background: #bc4c00; } .badge.running { background: #0969da; }
.badge.interrupted { background: #8250df; }
figure { margin: 16px 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.88em; }
.ok { color: #1a7f37; } .warn { color: #9a6700; }
h3 { font-size: 1.05em; margin: 20px 0 6px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #0969da; }
"""


@dataclass
class ReportInput:
    """Everything the report shows.

    Args:
        runset: all runs found.
        grid: the aggregated table.
        problems: runs left out of the table.
        notes: missing cells/seeds and duplicates.
        figures: ``(title, PNG bytes)`` of each plot, in display order.
        sources: what was read (sweep dirs or W&B projects).
        title: page heading.
        interval: what the table's cells show around the mean (:data:`~mbn.compare.stats.INTERVALS`).
        differences: the rows against the baseline; None for no differences section.
        difference_figure: ``(title, PNG bytes)`` of the differences plot, shown in that section.
    """

    runset: RunSet
    grid: Grid
    problems: list[RunProblem]
    notes: list[GridNote]
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    sources: Sequence[str] = ()
    title: str = "mbn-compare report"
    interval: str = STD
    differences: DifferenceTable | None = None
    difference_figure: tuple[str, bytes] | None = None


def render_report(report: ReportInput) -> str:
    """The report as one HTML document (a string)."""
    runs = report.runset.runs
    base = _common_dir(list(runs["run_dir"]))
    status_counts = Counter(runs["status"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body><main>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<p class="meta">Sources: {", ".join(f"<code>{html.escape(str(s))}</code>" for s in report.sources) or "—"}</p>',
        f'<p class="meta">{len(runs)} runs: '
        + ", ".join(f'<span class="badge {html.escape(s)}">{html.escape(s)}</span> {n}'
                    for s, n in sorted(status_counts.items()))
        + f" · mbn {html.escape(mbn.__version__)}</p>",
    ]
    if base:
        parts.append(f'<p class="meta">Run dirs below are relative to <code>{html.escape(base)}</code></p>')
    parts += ['<section id="table"><h2>Results</h2>']
    if report.grid.row_keys and report.grid.max_n:
        parts.append(format_table(report.grid, "html", interval=report.interval))
    else:
        parts.append("<p>No usable run yet: the table is empty (see the runs below).</p>")
    parts.append("</section>")
    if report.differences is not None:
        parts += _differences_section(report.differences, report.difference_figure)
    parts += _figures_section(report.figures)
    parts += _problems_section(report, base)
    parts += _notes_section(report.notes)
    parts += _config_section(report, base)
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | os.PathLike, report: ReportInput) -> Path:
    """Render the report and write it to ``path`` atomically."""
    text = render_report(report).encode("utf-8")
    return atomic_write(path, lambda f: f.write(text))


def _differences_section(differences: DifferenceTable, figure: tuple[str, bytes] | None) -> list[str]:
    heading = difference_title(differences)
    parts = [f'<section id="differences"><h2>{html.escape(heading[0].upper() + heading[1:])}</h2>']
    if differences.differences:
        parts.append(format_differences(differences, "html"))
    else:
        parts.append("<p>No row to compare with the baseline.</p>")
    if figure is not None:
        parts.append(_figure(*figure))
    parts.append("</section>")
    return parts


def _figures_section(figures: list[tuple[str, bytes]]) -> list[str]:
    parts = ['<section id="plots"><h2>Plots</h2>']
    if not figures:
        parts.append("<p>No plot: no usable run.</p>")
    parts += [_figure(title, png) for title, png in figures]
    parts.append("</section>")
    return parts


def _figure(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _problems_section(report: ReportInput, base: str) -> list[str]:
    problems = report.problems
    parts = [f'<section id="problems"><h2>Runs not in the table ({len(problems)})</h2>']
    if not problems:
        parts.append('<p class="ok">Every run is in the table.</p>')
    else:
        keys = list(report.grid.spec.keys)
        parts.append('<table class="list"><thead><tr><th>reason</th>'
                     + "".join(f"<th>{html.escape(short_key(k))}</th>" for k in keys)
                     + "<th>epochs</th><th>error (first line)</th><th>run dir</th></tr></thead><tbody>")
        for problem in problems:
            badge = problem.reason if problem.reason in _STATUS_BADGES else "failed"
            parts.append(
                f'<tr><td><span class="badge {badge}">{html.escape(problem.reason)}</span></td>'
                + "".join(f"<td>{html.escape(_text(problem.labels.get(k)))}</td>" for k in keys)
                + f"<td>{html.escape(problem.progress)}</td>"
                f'<td class="error">{html.escape(problem.error)}</td>'
                f'<td class="dir"><code>{html.escape(_relative(problem.run_dir, base))}</code></td></tr>')
        parts.append("</tbody></table>")
    parts.append("</section>")
    return parts


def _notes_section(notes: list[GridNote]) -> list[str]:
    parts = [f'<section id="missing"><h2>Missing grid cells and seeds ({len(notes)})</h2>']
    if not notes:
        parts.append('<p class="ok">Every cell has the same number of runs.</p>')
    else:
        parts.append('<table class="list"><thead><tr><th>kind</th><th>cell</th><th>detail</th></tr></thead><tbody>')
        parts += [f"<tr><td>{html.escape(n.kind)}</td><td>{html.escape(n.cell)}</td><td>{html.escape(n.detail)}</td></tr>"
                  for n in notes]
        parts.append("</tbody></table>")
    parts.append("</section>")
    return parts


def _config_section(report: ReportInput, base: str) -> list[str]:
    spec = report.grid.spec
    grid_keys = list(spec.keys)
    summary = summarize_config(report.runset, spec)
    runs = report.runset.runs
    parts = ['<section id="config"><h2>Config</h2>']
    if summary.varying:
        parts.append('<p class="warn">Config keys that vary besides the table keys (a confound unless intended): '
                     + ", ".join(f"<code>{html.escape(k)}</code> ({n} values)" for k, n in summary.varying.items())
                     + "</p>")
    else:
        parts.append('<p class="ok">All runs share the same config apart from the table keys '
                     f'({", ".join(html.escape(short_key(k)) for k in grid_keys)}) and the per-row settings.</p>')
    for row_key, settings in summary.row_settings.items():
        parts.append(f"<h3>Settings per {html.escape(short_key(row_key))}</h3>"
                     '<table class="list"><tbody>')
        for value, keys in settings.items():
            text = ", ".join(f"{k[len(row_key) - len('name'):]}={_text(v)}" for k, v in keys.items()) or "—"
            parts.append(f"<tr><th>{html.escape(_text(value))}</th><td><code>{html.escape(text)}</code></td></tr>")
        parts.append("</tbody></table>")
    parts.append("<h3>Per-run differences</h3><p>The keys whose value differs from the most common value "
                 "(per-row settings: within the row).</p>")
    parts.append('<table class="list"><thead><tr><th>run dir</th><th>status</th>'
                 + "".join(f"<th>{html.escape(short_key(k))}</th>" for k in grid_keys)
                 + "<th>differs from the common config</th></tr></thead><tbody>")
    for run_id, diff in summary.diffs.items():
        run = runs.loc[run_id]
        diff_text = "; ".join(f"{k}={_text(v)}" for k, v in diff.items()) or "—"
        parts.append(
            f'<tr><td class="dir"><code>{html.escape(_relative(str(run["run_dir"]), base))}</code></td>'
            f'<td><span class="badge {html.escape(str(run["status"]))}">{html.escape(str(run["status"]))}</span></td>'
            + "".join(f"<td>{html.escape(_text(plain(run.get(k))))}</td>" for k in grid_keys)
            + f"<td><code>{html.escape(diff_text)}</code></td></tr>")
    parts.append("</tbody></table>")
    parts.append(f"<details><summary>Common config ({len(summary.common)} keys)</summary>"
                 '<table class="list"><tbody>'
                 + "".join(f"<tr><td><code>{html.escape(k)}</code></td><td><code>{html.escape(_text(v))}</code></td></tr>"
                           for k, v in summary.common.items())
                 + "</tbody></table></details>")
    parts.append("</section>")
    return parts


_STATUS_BADGES = ("completed", "failed", "diverged", "running", "interrupted", "unreadable")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value)


def _common_dir(dirs: list[str]) -> str:
    """The longest common parent dir of local run dirs ('' for W&B URLs or a single run)."""
    local = [d for d in dirs if d and "://" not in d]
    if len(local) < 2 or len(local) != len(dirs):
        return ""
    try:
        return os.path.commonpath(local)
    except ValueError:
        return ""


def _relative(path: str, base: str) -> str:
    if not base or "://" in path:
        return path
    rel = os.path.relpath(path, base)
    return "." if rel == "." else rel
