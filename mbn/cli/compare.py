"""``mbn-compare``: the paper's table, plots and an HTML report from sweep dirs or a W&B project.

Examples::

    mbn-compare outputs/sweeps/demo                      # table to stdout, problems to stderr
    mbn-compare outputs/sweeps/a outputs/sweeps/b --format markdown --metric final_val_acc1
    mbn-compare outputs/sweeps/demo --out outputs/compare/demo   # + all formats, PNG/SVG, report.html
    mbn-compare outputs/sweeps/demo --baseline bn --interval ci95  # + differences to BN, 95% intervals
    mbn-compare --wandb me/mbn --wandb-group demo --out outputs/compare/demo-wandb

Exit codes: 0 ok, 1 W&B unreachable or writing ``--out`` failed midway (a full disk), 2 bad arguments
(an ``--out`` that is a file or cannot be written is found before any work) or no runs found.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence, TextIO

from mbn.compare.aggregate import DEFAULT_COLS, DEFAULT_CURVE_METRIC, DEFAULT_METRIC, DEFAULT_OVER, GridSpec, default_rows
from mbn.compare.collect import UNREADABLE, RunSet, read_records, runset_from_records, schema1_note
from mbn.compare.comparison import Comparison, UnknownColumnValue, compare, write_outputs
from mbn.compare.configdiff import summarize_config
from mbn.compare.differences import DEFAULT_DETECT, UnknownBaseline
from mbn.compare.problems import short_key
from mbn.compare.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, INTERVALS, STD
from mbn.compare.table import FORMATS
from mbn.compare.wandb_source import WandbReadError, check_project, fetch_records

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2
# Writing the --out files failed after the check (the disk filled up): the table was printed.
EXIT_WRITE_FAILED = 1
TABLE_FORMATS = tuple(f for f in FORMATS if f != "html")


class UsageError(Exception):
    """Bad arguments or nothing to compare (exit code 2)."""


def column_value(text: str) -> int | float:
    """A numeric column value from the command line: an int when it is one (a batch size), else a float (an lr)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbn-compare",
        description="Compare the runs of one or more sweeps: the paper's accuracy table (rows = norm, "
                    "columns = per-device batch size m, mean ± std over seeds), plots and an HTML report.",
        epilog="Runs not in the table (failed, diverged, running, interrupted, unreadable) and cells with "
               "missing seeds are listed on stderr and in the report. Exit codes: 0 ok, 1 W&B unreachable or "
               "writing --out failed, 2 bad arguments or no runs found.",
    )
    parser.add_argument("sweep_dirs", nargs="*", metavar="SWEEP_DIR",
                        help="sweep or run dirs searched for results.json (several sweeps are combined)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this W&B project")
    parser.add_argument("--wandb-group", metavar="GROUP", help="only W&B runs of this group (= sweep name)")
    parser.add_argument("--rows", metavar="KEY[,KEY...]",
                        help="config keys of the table rows (default: norm, plus model/data when they vary); "
                             "'norm' is short for 'norm.name'")
    parser.add_argument("--cols", default=DEFAULT_COLS, metavar="KEY", help=f"config key of the columns (default {DEFAULT_COLS})")
    parser.add_argument("--over", default=DEFAULT_OVER, metavar="KEY",
                        help=f"config key of the repeats averaged in a cell (default {DEFAULT_OVER})")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help=f"metric of results.json shown in the cells (default {DEFAULT_METRIC}, the test split after the last "
                             "epoch; final_val_acc1 / best_val_acc1 for the validation split of data.val_subset; a schema 1 "
                             "record's val_* metrics are its test-split numbers)")
    parser.add_argument("--format", default="text", choices=TABLE_FORMATS, help="table format on stdout (default text)")
    parser.add_argument("--decimals", type=int, default=2, help="digits after the point (default 2)")
    parser.add_argument("--out", metavar="DIR",
                        help="write the table in every format, the plots (PNG+SVG), runs.csv and report.html here")
    parser.add_argument("--curve-batch-size", type=column_value, metavar="M",
                        help="column value (batch size, or whatever --cols is: an lr of an lr grid) of the "
                             "accuracy-vs-epoch plot (default: the smallest)")
    parser.add_argument("--curve-metric", default=DEFAULT_CURVE_METRIC, metavar="KEY",
                        help=f"history key of the per-epoch plot (default {DEFAULT_CURVE_METRIC}; val_acc1 for the validation split)")
    parser.add_argument("--interval", default=STD, choices=INTERVALS,
                        help="what each cell and error bar shows around the mean: std = sample std (default), "
                             "ci95 = 95%% t confidence interval, bootstrap = 95%% percentile bootstrap of the mean "
                             f"({BOOTSTRAP_RESAMPLES} resamples, fixed seed {BOOTSTRAP_SEED}); needs >= 2 seeds per cell")
    parser.add_argument("--baseline", metavar="ROW",
                        help="also print the difference of every other row to this row (e.g. bn), per column: mean "
                             "difference with 95%% CI, p-value (paired by seed when both cells have the same seeds, "
                             "else Welch; Holm-adjusted over the columns), probability of improvement and the "
                             "seeds needed; with several row keys a value of one key (bn: each model vs its bn row) "
                             "or a full row label ('bn / resnet18')")
    parser.add_argument("--detect", type=float, default=DEFAULT_DETECT, metavar="POINTS",
                        help=f"difference (accuracy points) the 'seeds needed' of --baseline is for, with 80%% power "
                             f"at the 5%% level (default {DEFAULT_DETECT:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mbn-compare``; returns the exit code (also the console script's)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"mbn-compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WandbReadError as exc:
        print(f"mbn-compare: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _run(args: argparse.Namespace) -> int:
    if not args.sweep_dirs and not args.wandb:
        raise UsageError("give at least one SWEEP_DIR or --wandb ENTITY/PROJECT")
    if args.wandb_group and not args.wandb:
        raise UsageError("--wandb-group needs --wandb ENTITY/PROJECT")
    if args.decimals < 0:
        raise UsageError(f"--decimals must be >= 0, got {args.decimals}")
    if not args.detect > 0:
        raise UsageError(f"--detect must be > 0 (points), got {args.detect}")
    if args.wandb:
        try:
            check_project(args.wandb)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if args.out:
        _check_writable_dir(args.out)
    runset, sources = _read(args)
    readable = runset.runs[runset.runs["status"] != UNREADABLE]
    if readable.empty:
        _print_unreadable(runset, sys.stderr)
        raise UsageError(f"no readable runs found in {', '.join(sources)}"
                         + (f" ({len(runset)} unreadable results.json listed above)" if len(runset) else ""))
    spec = _spec(args, runset)
    note = schema1_note(runset, [spec.metric, args.curve_metric])
    if note:
        print(f"mbn-compare: note: {note}", file=sys.stderr)
    try:
        comparison = compare(runset, spec, curve_col=args.curve_batch_size, curve_metric=args.curve_metric,
                             interval=args.interval, baseline=args.baseline, detect=args.detect)
    except (UnknownColumnValue, UnknownBaseline) as exc:
        raise UsageError(str(exc)) from exc
    sys.stdout.write(comparison.format(args.format, decimals=args.decimals))
    sys.stdout.flush()
    _print_problems(comparison, sys.stderr)
    if args.out:
        try:
            written = write_outputs(comparison, args.out, sources)
        except OSError as exc:  # e.g. the disk filled up while writing
            print(f"mbn-compare: error: writing to --out {args.out} failed: {exc.strerror or exc}"
                  + (f" ({exc.filename})" if exc.filename else ""), file=sys.stderr)
            return EXIT_WRITE_FAILED
        print(f"wrote {len(written)} files to {args.out} (open {args.out}/report.html)", file=sys.stderr)
    return EXIT_OK


def _check_writable_dir(out: str) -> None:
    """Create ``--out`` if missing and check a file can be written there, before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there: {exc.strerror or exc}") from None


def _read(args: argparse.Namespace) -> tuple[RunSet, list[str]]:
    records: list[tuple[str, Any]] = []
    sources: list[str] = []
    if args.sweep_dirs:
        try:
            records += read_records(args.sweep_dirs)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from exc
        sources += [str(d) for d in args.sweep_dirs]
    if args.wandb:
        records += fetch_records(args.wandb, args.wandb_group, progress=sys.stderr)
        sources.append(f"wandb:{args.wandb}" + (f" (group {args.wandb_group})" if args.wandb_group else ""))
    if not records:
        where = ", ".join(sources)
        raise UsageError(f"no runs found in {where} (no results.json below the given dirs"
                         + (", no run in the W&B project" if args.wandb else "") + ")")
    return runset_from_records(records), sources


def _spec(args: argparse.Namespace, runset: RunSet) -> GridSpec:
    def resolve(key: str, option: str) -> str:
        try:
            return runset.resolve_key(key)
        except KeyError as exc:
            raise UsageError(f"{option}: {exc.args[0]}") from exc

    if args.rows:
        rows = tuple(resolve(key.strip(), "--rows") for key in args.rows.split(",") if key.strip())
        if not rows:
            raise UsageError(f"--rows needs at least one key, got {args.rows!r}")
    else:
        rows = tuple(resolve(key, "--rows") for key in default_rows(runset))
    cols, over = resolve(args.cols, "--cols"), resolve(args.over, "--over")
    if args.metric not in runset.metric_keys:
        raise UsageError(f"--metric: unknown metric {args.metric!r}; known: {', '.join(runset.metric_keys)}")
    keys = (*rows, cols, over)
    if len(set(keys)) != len(keys):
        raise UsageError(f"--rows/--cols/--over must be different keys, got rows={list(rows)} cols={cols} over={over}")
    return GridSpec(rows=rows, cols=cols, over=over, metric=args.metric)


def _print_problems(comparison: Comparison, out: TextIO) -> None:
    problems, notes, grid = comparison.problems, comparison.notes, comparison.grid
    total = len(comparison.runset)
    if not grid.max_n:
        print(f"no usable run yet: the table is empty ({total} runs found)", file=out)
    if problems:
        print(f"{len(problems)} of {total} runs are not in the table:", file=out)
        for p in problems:
            labels = " ".join(f"{short_key(k)}={v}" for k, v in p.labels.items())
            progress = f" epoch {p.progress}" if p.progress else ""
            error = f"  {p.error}" if p.error else ""
            print(f"  {p.reason:<12} {labels}{progress}{error}  [{p.run_dir}]", file=out)
    for note in notes:
        print(f"{note.kind}: {note.cell}: {note.detail}", file=out)
    varying = summarize_config(comparison.runset, grid.spec).varying
    if varying:
        print("note: config keys that vary besides the table keys (see the report's config diff): "
              + ", ".join(f"{k} ({n} values)" for k, n in varying.items()), file=out)


def _print_unreadable(runset: RunSet, out: TextIO) -> None:
    for _, run in runset.runs.iterrows():
        print(f"  {run['status']:<12} {run['error']}  [{run['source']}]", file=out)


if __name__ == "__main__":
    sys.exit(main())
