"""Compare runs: the paper's table and figures, and an HTML report, from results.json files or W&B.

Typical use (what ``mbn-compare`` does)::

    runset = collect_runs(["outputs/sweeps/demo"])
    comparison = compare(runset, GridSpec(rows=default_rows(runset)))
    print(format_table(comparison.grid, "markdown"))
    write_outputs(comparison, "outputs/compare/demo")
"""

from mbn.compare.aggregate import Cell, Grid, GridSpec, build_grid, default_rows
from mbn.compare.collect import RunSet, collect_runs, load_runs, runset_from_records
from mbn.compare.comparison import Comparison, compare, write_outputs
from mbn.compare.table import FORMATS, format_table

__all__ = [
    "Cell", "Grid", "GridSpec", "build_grid", "default_rows",
    "RunSet", "collect_runs", "load_runs", "runset_from_records",
    "Comparison", "compare", "write_outputs",
    "FORMATS", "format_table",
]
