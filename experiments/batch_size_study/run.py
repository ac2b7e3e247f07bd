"""The CPU batch-size studies of EXPERIMENTS.md, run as the ``mbn-train`` sweeps a user would type.

Usage::

    python -m experiments.batch_size_study.run --dry-run          # print the powered study's commands
    python -m experiments.batch_size_study.run --publish experiments/batch_size_study/results
    python -m experiments.batch_size_study.run --study undertrained --out outputs/study_cpu

A study is a list of ``mbn-train -m`` commands (:data:`STUDIES`): the CLI's own sweeps, with the
seeds of a cell stacked into one process (``stack=K``) and the joblib launcher running two
processes at a time (set in the experiment config). The runner prints each command, runs it as it
is printed (``mbn-train`` is ``python -m mbn.cli.train``), then the ``mbn-compare`` commands of the
study's tables and plots. Every command is resumable: rerunning the study skips the runs that
finished and resumes interrupted ones, so a study may run in parts. ``--publish DIR`` copies the
commit-ready outputs (tables, differences, plots, one CSV row and the ``results.json`` of every run).
Before its commands run, the runner copies the finished records its study published in this
repository back into the sweep dir (``--no-restore``: train everything), so a chunk run on a fresh
clone picks up where the committed records end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from experiments.batch_size_study.curve import (FACTORS_FILE, NORM_NAMES, PEERS, REFERENCE_LR, at_chosen_factor, grid_extensions,
                                               is_grid_run, read_factors, seed_sweeps, select_runs)
from mbn.results import copy_results
from mbn.utils.io import atomic_write

if TYPE_CHECKING:
    import pandas as pd

# The test accuracy after the last epoch: no choice of epoch on the test images. The published
# studies' records are results schema 1, which called it final_val_acc1 (mbn-compare reads both).
TABLE_METRIC = "final_test_acc1"
# Tables besides the main one: (metric, decimals); each is mbn-compare's stdout, saved as <metric>.md.
SIDE_TABLES = (("final_train_loss", 3), ("final_train_acc1", 2))
# Columns of the published runs CSV besides the config keys that vary between runs.
RUN_COLUMNS = ("status", "epochs_completed", "final_test_acc1", "final_test_acc5", "final_test_loss", "best_test_acc1",
               "final_val_acc1", "best_val_acc1", "best_epoch", "best_epoch_test_acc1", "final_train_loss", "final_train_acc1",
               "wall_time_s", "total_wall_time_s", "config_hash")
# mbn-train's exit code when stopped (a negative code = killed by a signal): start nothing after it.
INTERRUPTED_EXIT_CODE = 130
# The user-facing entry points and the module each one runs.
ENTRY_POINTS = {"mbn-train": "mbn.cli.train", "mbn-compare": "mbn.cli.compare"}
# Where a study's published dir (Study.published) is resolved.
REPO_ROOT = Path(__file__).resolve().parents[2]
# The curve study's published dir (its grids and seeds share it). The earlier studies publish none to
# restore: their records predate the config's current form (a rerun would replace them, not skip).
CURVE_PUBLISHED = "experiments/batch_size_study/results_curve"


@dataclass(frozen=True)
class Study:
    """One batch-size study: its experiment config and the sweeps that make its cells.

    Args:
        experiment: experiment config name (``configs/experiment/<name>.yaml``); its ``sweep_name``
            must be ``sweep_name``.
        sweep_name: the sweep dir every command writes into (``<output_root>/sweeps/<sweep_name>``).
        sweeps: the Hydra overrides of each ``mbn-train -m`` command, after ``experiment=...``.
        curve_batch_size: column value (batch size; an lr for the grids) of the accuracy-per-epoch plot (None:
            mbn-compare's default).
        baseline: the row every other row is compared with, or None for no difference table.
        rows: mbn-compare's ``--rows`` (config keys of the table rows).
        cols: mbn-compare's ``--cols`` (config key of the columns).
        metric: the main table's metric.
        curve_metric: the history key of the accuracy-per-epoch plot.
        compare_name: the dir of its tables under ``<output_root>/compare/`` (None: ``sweep_name``).
        other_baselines: rows every other row is also compared with, each table saved as
            ``differences_to_<row>.md`` (the fair curve study compares every norm with MBN as well).
        published: the dir (relative to the repository root) its records are published to, whose
            ``runs/`` the runner restores into the sweep dir (None: nothing to restore).
        selection: which of the sweep dir's runs its tables read, by config (None: all); the
            selected records are copied to ``<compare dir>/selected`` for mbn-compare.
        follow_up: the sweeps that the records of ``sweeps`` ask for, run after them (given the sweep
            dir): a grid's extension past the edge where its best is (None: nothing follows).
    """

    experiment: str
    sweep_name: str
    sweeps: tuple[tuple[str, ...], ...]
    curve_batch_size: int | float | None
    baseline: str | None = "bn"
    rows: str = "norm"
    cols: str = "data.batch_size"
    metric: str = TABLE_METRIC
    curve_metric: str = "test_acc1"
    compare_name: str | None = None
    other_baselines: tuple[str, ...] = ()
    published: str | None = None
    selection: Callable[[Mapping[str, Any]], bool] | None = None
    follow_up: Callable[[Path], tuple[tuple[str, ...], ...]] | None = None

    def train_commands(self, extra: Sequence[str] = (), sweeps: Sequence[tuple[str, ...]] | None = None) -> list[list[str]]:
        """The study's ``mbn-train -m`` commands (of ``sweeps``, default its own), each with the overrides ``extra`` appended."""
        return [["mbn-train", "-m", f"experiment={self.experiment}", *sweep, *extra]
                for sweep in (self.sweeps if sweeps is None else sweeps)]

    def compare_commands(self, sweep_dir: Path, compare_dir: Path) -> list[tuple[list[str], Path | None]]:
        """``(mbn-compare command, file its stdout goes to or None)`` of the study's tables and plots."""
        layout = ["--rows", self.rows, "--cols", self.cols]
        main = ["mbn-compare", str(sweep_dir), "--out", str(compare_dir), "--format", "markdown", *layout,
                "--metric", self.metric, "--interval", "ci95", "--curve-metric", self.curve_metric]
        if self.curve_batch_size is not None:
            main += ["--curve-batch-size", str(self.curve_batch_size)]
        if self.baseline is not None:
            main += ["--baseline", self.baseline]
        side = [(["mbn-compare", str(sweep_dir), "--format", "markdown", *layout, "--metric", metric, "--interval", "ci95",
                  "--decimals", str(decimals)], compare_dir / f"{metric}.md") for metric, decimals in SIDE_TABLES]
        others = [(["mbn-compare", str(sweep_dir), "--format", "markdown", *layout, "--metric", self.metric, "--interval", "ci95",
                    "--baseline", row], compare_dir / f"differences_to_{row}.md") for row in self.other_baselines]
        return [(main, None), *side, *others]


def curve_grid_study(*sweeps: tuple[str, ...]) -> Study:
    """Lr grids of the fair curve study (its sweep dir): tables of ``final_val_acc1`` by norm and m
    against the lr, and the validation curves (at factor 1, the linear-scaling rule's lr), in
    ``<output_root>/compare/study_curve_grid``. After the grids, the extension each grid asks for runs.

    Args:
        sweeps: the grids' overrides; each names its norms (``norm=a,b``) and batch sizes (``data.batch_size=m``).
    """
    cells = []
    for sweep in sweeps:
        values = dict(override.split("=", 1) for override in sweep)
        cells += [(NORM_NAMES[option], int(m)) for option in values["norm"].split(",") for m in values["data.batch_size"].split(",")]
    return Study(experiment="study_curve", sweep_name="study_curve", sweeps=sweeps, curve_batch_size=REFERENCE_LR, baseline=None,
                 rows="norm,data.batch_size", cols="optim.base_lr", metric="final_val_acc1", curve_metric="val_acc1",
                 compare_name="study_curve_grid", published=CURVE_PUBLISHED, selection=is_grid_run,
                 follow_up=lambda sweep_dir: grid_extensions(sweep_dir, cells))


STUDIES: dict[str, Study] = {
    # The powered study (EXPERIMENTS.md, "Batch-size study in a trained regime: protocol"): 30 epochs,
    # 5,000 images; seeds of a cell stacked (stacking does not pay at m = 32, where a step is already
    # large); two processes at a time (joblib, configs/experiment/study_trained.yaml).
    "trained": Study(
        experiment="study_trained",
        sweep_name="study_trained",
        sweeps=(
            ("norm=bn,mbn", "data.batch_size=2", "seed=0,1,2,3,4", "stack=5"),
            ("norm=bn", "data.batch_size=32", "seed=0,1,2,3,4"),
            ("norm=mbn", "data.batch_size=32", "seed=0"),
            ("norm=bn,mbn", "data.batch_size=8", "seed=0,1,2", "stack=3"),
            ("norm=gn,brn", "data.batch_size=2", "seed=0,1,2", "stack=3"),
        ),
        curve_batch_size=2,
    ),
    # The fair curve study's lr grids (EXPERIMENTS.md, "The paper's figure, fairly: protocol"): factors
    # 0.3, 1, 3, 10 of lr = 0.1 m / 64 on seed 0, read on the validation split only (final_val_acc1).
    # At m = 2 each norm's grid is one stacked pack of 4 (two packs at a time); at m = 32 stacking
    # loses, so the 12 runs go 2 at a time unstacked (MBN at m = 32 is BN: it takes BN's factor).
    "curve_grid": curve_grid_study(
        ("norm=bn,mbn", "data.batch_size=2", "optim.base_lr=0.03,0.1,0.3,1", "stack=4"),
        ("norm=gn,brn_epochs", "data.batch_size=2", "optim.base_lr=0.03,0.1,0.3,1", "stack=4"),
        ("norm=bn,gn,brn_epochs", "data.batch_size=32", "optim.base_lr=0.03,0.1,0.3,1"),
    ),
    # The small-batch peers' lr grids (EXPERIMENTS.md, "The small-batch peers in the fair curve study:
    # protocol"): tuned as BN, GN, BRN and MBN, at m = 2 (stacked) and 32, in the same sweep dir. One
    # command per peer and m, each a chunk that ends within a working session, the costliest first
    # (the pilots' order), so that --jobs 2 keeps both processes busy.
    "peers_grid": curve_grid_study(
        *((f"norm={peer}", "data.batch_size=2", "optim.base_lr=0.03,0.1,0.3,1", "stack=4") for peer in PEERS),
        *((f"norm={peer}", "data.batch_size=32", "optim.base_lr=0.03,0.1,0.3,1") for peer in PEERS),
    ),
    # The earlier, under-trained study (6 epochs, 3,000 images; every norm x m in {2..32} x 2 seeds).
    # With 6 epochs MBN uses the per-iteration schedule: the per-epoch one moves lam in 6 large jumps.
    "undertrained": Study(
        experiment="study_cpu",
        sweep_name="study_cpu",
        sweeps=(("norm=bn,gn,brn", "seed=0,1"), ("norm=mbn", "norm.schedule=iteration", "seed=0,1")),
        curve_batch_size=2,
        baseline=None,
    ),
}


def curve_study(factors: dict[str, dict[int, float]]) -> Study:
    """The fair curve study's seeds at the chosen factors (:mod:`experiments.batch_size_study.curve`):
    its runs share the grids' sweep dir, so the grids' seed-0 runs at the chosen factors are reused."""
    return Study(experiment="study_curve", sweep_name="study_curve", sweeps=seed_sweeps(factors), curve_batch_size=2,
                 other_baselines=("mbn",), published=CURVE_PUBLISHED, selection=at_chosen_factor(factors))


def executable(command: Sequence[str]) -> list[str]:
    """The argv that runs ``command``: an entry point (``mbn-train``) becomes ``python -m <its module>``,
    so the study runs with this interpreter whether or not the entry points are on PATH."""
    head, *rest = command
    return [sys.executable, "-m", ENTRY_POINTS[head], *rest] if head in ENTRY_POINTS else list(command)


def shown(command: Sequence[str], stdout: Path | None = None) -> str:
    """``command`` as a user would type it in a shell."""
    return shlex.join(command) + (f" > {shlex.quote(str(stdout))}" if stdout is not None else "")


def run_commands(commands: Sequence[tuple[Sequence[str], Path | None]], jobs: int = 1, log_dir: Path | None = None) -> list[int]:
    """Run the commands, each printed first, ``jobs`` at a time; a command's output goes to this
    process's stdout, or to its file (with ``jobs > 1``, to ``log_dir/command-<i>.log``).

    Args:
        commands: ``(command, file for its stdout or None)`` pairs.
        jobs: how many commands run at once.
        log_dir: where the commands' logs go when several run at once.

    Returns:
        the exit code of every command started, in the order they were given; after an interrupted
        or killed command (exit 130 or a signal) no further command starts.
    """
    pending = list(enumerate(commands))
    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    codes: dict[int, int] = {}
    stopped = False
    while pending or running:
        while pending and not stopped and len(running) < jobs:
            index, (command, stdout) = pending.pop(0)
            if stdout is None and jobs > 1 and log_dir is not None:
                stdout = log_dir / f"command-{index + 1}.log"
            _say(f"$ {shown(command, stdout)}")
            out = None
            if stdout is not None:
                stdout.parent.mkdir(parents=True, exist_ok=True)
                out = open(stdout, "w")
            running[index] = (subprocess.Popen(executable(command), stdout=out, stderr=subprocess.STDOUT if out and jobs > 1 else None),
                              time.monotonic(), out)
        if not running:  # stopped: what is pending does not start
            break
        finished = _wait_any(running)
        process, started, out = running.pop(finished)
        if out is not None:
            out.close()
        codes[finished] = process.returncode
        _say(f"exit {process.returncode} after {time.monotonic() - started:.0f} s: {shown(commands[finished][0])}")
        if process.returncode < 0 or process.returncode == INTERRUPTED_EXIT_CODE:
            stopped = True
    return [codes[index] for index in sorted(codes)]


def _wait_any(running: dict[int, tuple[subprocess.Popen, float, object]]) -> int:
    # The index of a finished process (polling: the processes run for minutes to hours).
    while True:
        for index, (process, _, _) in running.items():
            if process.poll() is not None:
                return index
        time.sleep(0.5)


def sweep_dir_of(study: Study, output_root: str | os.PathLike | None) -> Path:
    """The study's sweep dir: ``<output_root>/sweeps/<sweep_name>``, with the config's default
    output_root (:class:`mbn.cli.schema.TrainConfig`'s: ``$MBN_OUTPUT_ROOT`` or ``outputs``) when none is given."""
    if output_root is None:
        from omegaconf import OmegaConf

        from mbn.cli.schema import TrainConfig

        output_root = OmegaConf.create({"output_root": TrainConfig.output_root}).output_root
    return Path(output_root) / "sweeps" / study.sweep_name


def compact_runs(runs_csv: Path) -> "pd.DataFrame":
    """mbn-compare's ``runs.csv`` cut to one row per run: the config keys that vary, then the metrics.

    Args:
        runs_csv: the ``runs.csv`` written by ``mbn-compare --out``.
    """
    import pandas as pd

    runs = pd.read_csv(runs_csv)
    config_keys = [c for c in runs.columns if "." in c or c in ("seed", "epochs")]
    varying = [c for c in config_keys if runs[c].astype(str).nunique(dropna=False) > 1]
    first = [c for c in ("norm.name", "data.batch_size", "seed") if c in varying]
    columns = first + [c for c in varying if c not in first] + [c for c in RUN_COLUMNS if c in runs.columns]
    return runs[columns].sort_values(first).reset_index(drop=True)


def publish(compare_dir: Path, sweep_dir: Path, target: Path, records_dir: Path | None = None) -> list[Path]:
    """Copy the commit-ready outputs of a study to ``target``.

    That is: mbn-compare's ``table.md``, ``differences.csv``, the side tables, the tables of the
    differences to other baselines (``differences_to_<row>.md``) and the PNG plots;
    ``runs.csv`` cut to the varying config keys and the metrics (:func:`compact_runs`); and the
    ``results.json`` of every finished run (:func:`is_finished`) under ``records_dir/<run dir>/`` (copied back into a
    sweep dir, they let the study's commands skip those runs: :func:`restore`). A run still
    running or interrupted is not published: its record would say so forever.

    Args:
        compare_dir: the main mbn-compare's ``--out`` dir.
        sweep_dir: the study's sweep dir.
        target: e.g. ``experiments/batch_size_study/results``.
        records_dir: where the records go (default ``target/runs``; the curve study's grids and seeds,
            which share a sweep dir, keep them in one place whatever their tables' ``target``).
    """
    target.mkdir(parents=True, exist_ok=True)
    names = ["table.md", "differences.csv", *(f"{metric}.md" for metric, _ in SIDE_TABLES)]
    sources = [compare_dir / name for name in names] + sorted(compare_dir.glob("differences_to_*.md")) + sorted(compare_dir.glob("*.png"))
    copied = [Path(shutil.copy2(source, target / source.name)) for source in sources if source.exists()]
    runs = compact_runs(compare_dir / "runs.csv")
    atomic_write(target / "runs.csv", lambda f: f.write(runs.to_csv(index=False, float_format="%.4f").encode()))
    copied.append(target / "runs.csv")
    records_dir = target / "runs" if records_dir is None else records_dir
    copied += copy_results(sweep_dir, records_dir, keep=is_finished)
    return copied


def restore(published_runs: Path, sweep_dir: Path) -> list[Path]:
    """Copy the finished records under ``published_runs`` (a published dir's ``runs/``) into
    ``sweep_dir``, each to its run dir, so the study's commands skip those runs.

    Only finished records (:func:`is_finished`) are copied, and only into a run dir that holds no ``results.json``:
    a record there (finished, interrupted with its checkpoint, or running) is this machine's own
    and is left as it is.

    Args:
        published_runs: e.g. ``experiments/batch_size_study/results_curve/runs`` (missing: nothing to restore).
        sweep_dir: the study's sweep dir.

    Returns:
        The records written into the sweep dir.
    """
    if not published_runs.is_dir():
        return []
    return copy_results(published_runs, sweep_dir, keep=is_finished, overwrite=False)


def is_finished(record: Mapping[str, Any]) -> bool:
    """Whether a run record is one to publish or restore: ``completed`` or ``diverged``, the two
    that a sweep keeps as final (a running or interrupted one would say so forever once copied)."""
    return record["status"] in ("completed", "diverged")


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.batch_size_study.run", description=__doc__.split("\n")[0])
    parser.add_argument("--study", choices=sorted([*STUDIES, "curve"]), default="trained",
                        help="which study (default trained; curve = the fair curve study's seeds, once its factors are chosen)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run N commands at once, each one process (hydra.launcher.n_jobs=1), logs in <compare dir>/logs/")
    parser.add_argument("--out", help="output_root of the runs (default: the config's, $MBN_OUTPUT_ROOT or outputs)")
    parser.add_argument("--compare-dir", help="mbn-compare's --out (default <output_root>/compare/<sweep_name>)")
    parser.add_argument("--publish", metavar="DIR", help="copy tables, plots, runs CSV and run records here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    stages = parser.add_mutually_exclusive_group()
    stages.add_argument("--no-compare", action="store_true", help="run the sweeps only")
    stages.add_argument("--no-train", action="store_true",
                        help="compare (and publish) the runs there are, training nothing: a study part-way, or on a "
                             "machine that has its records but not the time")
    parser.add_argument("--no-restore", action="store_true",
                        help="train every run: do not copy the study's published finished records into the sweep dir first")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every mbn-train command (e.g. epochs=1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a study; returns 0 when every command succeeded."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.study == "curve":
        factors = read_factors()
        if factors is None:
            print(f"{parser.prog}: the curve study's factors are not chosen yet ({FACTORS_FILE} is missing): run the grids "
                  f"(--study curve_grid), then python -m experiments.batch_size_study.curve <sweep dir> --write {FACTORS_FILE}",
                  file=sys.stderr)
            return 2
        study = curve_study(factors)
    else:
        study = STUDIES[args.study]
    extra = [*([f"output_root={args.out}"] if args.out is not None else []), *args.overrides,
             *(["hydra.launcher.n_jobs=1"] if args.jobs > 1 else [])]
    sweep_dir = sweep_dir_of(study, args.out)
    compare_dir = Path(args.compare_dir) if args.compare_dir else sweep_dir.parent.parent / "compare" / (study.compare_name or study.sweep_name)
    train = [] if args.no_train else [(command, None) for command in study.train_commands(extra)]
    # The curve study's sweep dir holds its grids and its seeds: each table reads a selection.
    compare_source = compare_dir / "selected" if study.selection is not None else sweep_dir
    compare = [] if args.no_compare else study.compare_commands(compare_source, compare_dir)
    if args.dry_run:
        for command, stdout in train:
            print(shown(command, stdout))
        if study.follow_up is not None and not args.no_train:
            follow = study.train_commands(extra, study.follow_up(sweep_dir))
            print(f"# then the extension each grid's records ask for (its best factor at an edge): {'these, so far' if follow else 'none so far'}")
            for command in follow:
                print(shown(command))
        for command, stdout in compare:
            print(shown(command, stdout))
        return 0
    if study.published is not None and not args.no_restore:
        published_runs = REPO_ROOT / study.published / "runs"
        restored = restore(published_runs, sweep_dir)
        if restored:
            _say(f"restored {len(restored)} finished runs from {published_runs} into {sweep_dir} (--no-restore: train them)")
    started = time.monotonic()
    codes = run_commands(train, jobs=args.jobs, log_dir=compare_dir / "logs")
    if study.follow_up is not None and not args.no_train and len(codes) == len(train) and all(code == 0 for code in codes):
        follow = [(command, None) for command in study.train_commands(extra, study.follow_up(sweep_dir))]
        train += follow
        codes += run_commands(follow, jobs=args.jobs, log_dir=compare_dir / "logs" / "follow_up")
    if not args.no_train:
        _say(f"sweeps done in {time.monotonic() - started:.0f} s; exit codes {codes}")
    status = 0 if len(codes) == len(train) and all(code == 0 for code in codes) else 1
    if len(codes) < len(train) or not compare:
        return status
    if study.selection is not None:
        selected = select_runs(sweep_dir, compare_source, study.selection)
        _say(f"selected the {len(selected)} runs its tables read into {compare_source}")
    # An earlier compare's plots (another curve column, a row since dropped) must not be published as this one's.
    for stale in [*compare_dir.glob("*.png"), *compare_dir.glob("*.svg")] if compare_dir.is_dir() else ():
        stale.unlink()
    if any(code != 0 for code in run_commands(compare)):
        return 1
    if args.publish:
        records_dir = REPO_ROOT / study.published / "runs" if study.published is not None else None
        for path in publish(compare_dir, sweep_dir, Path(args.publish), records_dir):
            _say(f"published {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
