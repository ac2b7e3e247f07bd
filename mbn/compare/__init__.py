"""Compare runs: the paper's table and figures, and an HTML report, from results.json files or W&B.

Typical use (what ``mbn-compare`` does)::

    runset = collect_runs(["outputs/sweeps/demo"])
    comparison = compare(runset, GridSpec(rows=default_rows(runset)), interval="ci95", baseline="bn")
    print(comparison.format("markdown"))    # the table, then the differences to bn
    write_outputs(comparison, "outputs/compare/demo")
"""

from mbn.compare.aggregate import Cell, Grid, GridSpec, build_grid, default_rows
from mbn.compare.collect import RunSet, collect_runs, load_runs, runset_from_records
from mbn.compare.comparison import Comparison, compare, write_outputs
from mbn.compare.differences import DifferenceTable, UnknownBaseline, compute_differences, format_differences
from mbn.compare.table import FORMATS, format_table

__all__ = [
    "Cell", "Grid", "GridSpec", "build_grid", "default_rows",
    "RunSet", "collect_runs", "load_runs", "runset_from_records",
    "Comparison", "compare", "write_outputs",
    "DifferenceTable", "UnknownBaseline", "compute_differences", "format_differences",
    "FORMATS", "format_table",
]
