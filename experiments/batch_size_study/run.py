"""The CPU-scale batch-size study: BN/GN/BRN/MBN x m in {2..32} x 2 seeds, two sweeps in parallel.

Usage::

    python -m experiments.batch_size_study.run --out outputs/study_cpu
    python -m experiments.batch_size_study.run --out outputs/study_cpu --publish experiments/batch_size_study/results

The grid is split into chunks of one ``mbn-train -m`` sweep each (one norm and one seed, over the
batch sizes of ``configs/experiment/<experiment>.yaml``); ``--jobs`` workers take chunks from a
shared queue, each a separate 1-thread process (a small-batch step gains little from a second
thread, so one process per core uses the cores better than one process with two threads). All chunks write into the same sweep dir
``<out>/sweeps/<sweep_name>/<job overrides>``, so rerunning the command skips completed runs and
resumes interrupted ones. Afterwards ``mbn-compare`` writes the table, plots and report to
``<out>/compare``; ``--publish DIR`` copies the commit-ready subset there.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from mbn.utils.io import atomic_write

if TYPE_CHECKING:
    import pandas as pd

# Norm-specific options the study adds (they are keys of one norm config only, so they cannot be
# set in the experiment file, which applies to every norm of the sweep).
NORM_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "bn": (),
    # GN's default is width-scaled (mbn.train.spec.width_scaled_gn_groups): 8 groups at width 16, the
    # paper's GN-32-at-width-64 group size (2 channels per group in the first stage); nothing to add.
    "gn": (),
    "brn": (),
    # With 6 epochs the per-epoch schedule moves lam in 6 large jumps (at m=2: 0.51 in epoch 5,
    # 0.94 in epoch 6); per-iteration follows the same curve smoothly, as 200 epochs nearly do.
    "mbn": ("norm.schedule=iteration",),
}
DEFAULT_SEEDS = (0, 1)
# The accuracy after the last epoch: no choice of epoch on the test images (best_val_acc1 would be one).
TABLE_METRIC = "final_val_acc1"
# Columns of the published runs CSV besides the config keys that vary between runs.
RUN_COLUMNS = ("status", "epochs_completed", "final_val_acc1", "best_val_acc1", "best_epoch", "final_val_acc5",
               "final_val_loss", "final_train_loss", "wall_time_s", "config_hash")
# mbn-train's exit code when stopped (a negative code = killed by a signal).
INTERRUPTED_EXIT_CODE = 130


@dataclass(frozen=True)
class Chunk:
    """One ``mbn-train -m`` sweep of the study: one norm, one seed, all batch sizes.

    Args:
        norm: norm config name (``bn``, ``gn``, ``brn``, ``mbn``).
        seed: the run seed.
    """

    norm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.norm}_seed{self.seed}"


def chunks(norms: Sequence[str], seeds: Sequence[int]) -> list[Chunk]:
    """The study's chunks, seed-major (every norm of seed 0 first, so a cut-short study is balanced).

    Args:
        norms: norm names, each a key of :data:`NORM_OVERRIDES`.
        seeds: seeds, each >= 0.
    """
    for norm in norms:
        if norm not in NORM_OVERRIDES:
            raise ValueError(f"norms: unknown norm {norm!r}; expected one of {sorted(NORM_OVERRIDES)}")
    for seed in seeds:
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seeds: must be integers >= 0, got {seed!r}")
    if not norms or not seeds:
        raise ValueError(f"need at least one norm and one seed, got norms={list(norms)}, seeds={list(seeds)}")
    return [Chunk(norm, int(seed)) for seed in seeds for norm in norms]


def train_command(chunk: Chunk, experiment: str, output_root: str | os.PathLike, extra: Sequence[str] = ()) -> list[str]:
    """The ``mbn-train -m`` command of one chunk.

    Args:
        chunk: the norm and seed.
        experiment: experiment config name (``configs/experiment/<name>.yaml``).
        output_root: ``output_root`` of the runs (the sweep dir is ``<output_root>/sweeps/<sweep_name>``).
        extra: further Hydra overrides, applied to every chunk (e.g. ``epochs=1``).
    """
    return [
        sys.executable, "-m", "mbn.cli.train", "-m",
        f"experiment={experiment}",
        f"norm={chunk.norm}", *NORM_OVERRIDES[chunk.norm],
        f"seed={chunk.seed}",
        f"output_root={output_root}",
        *extra,
    ]


def compare_command(
    sweep_dir: str | os.PathLike, out_dir: str | os.PathLike, metric: str = TABLE_METRIC, curve_batch_size: int | None = None
) -> list[str]:
    """The ``mbn-compare`` command writing the table, plots and report of the study.

    Args:
        sweep_dir: the study's sweep dir.
        out_dir: where mbn-compare writes its outputs.
        metric: the metric of the table and the accuracy-vs-m plot.
        curve_batch_size: batch size of the per-epoch plot; None = mbn-compare's default (the smallest).
    """
    command = [sys.executable, "-m", "mbn.cli.compare", str(sweep_dir), "--out", str(out_dir), "--format", "markdown",
               "--metric", metric]
    if curve_batch_size is not None:
        command += ["--curve-batch-size", str(curve_batch_size)]
    return command


def single_thread_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a worker process: one BLAS/OpenMP thread (the config sets torch's own)."""
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_chunks(commands: Mapping[str, list[str]], jobs: int, log_dir: Path) -> dict[str, int]:
    """Run the commands with ``jobs`` parallel workers; each logs to ``log_dir/<name>.log``.

    Args:
        commands: chunk name -> command, in the order they are started.
        jobs: number of parallel worker processes (>= 1).
        log_dir: dir of the per-chunk logs.

    Returns:
        chunk name -> exit code of every chunk started; after an interrupted or killed chunk no
        further chunk starts.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    log_dir.mkdir(parents=True, exist_ok=True)
    pending: queue.Queue[str] = queue.Queue()
    for name in commands:
        pending.put(name)
    codes: dict[str, int] = {}
    lock = threading.Lock()
    # Set when a chunk was interrupted or killed: start no further chunks (rerun to continue).
    stop = threading.Event()
    env = single_thread_env()

    def worker() -> None:
        while not stop.is_set():
            try:
                name = pending.get_nowait()
            except queue.Empty:
                return
            started = time.monotonic()
            _say(f"start {name}")
            with open(log_dir / f"{name}.log", "a") as log:
                code = subprocess.call(commands[name], stdout=log, stderr=subprocess.STDOUT, env=env)
            with lock:
                codes[name] = code
            if code < 0 or code == INTERRUPTED_EXIT_CODE:
                stop.set()
            _say(f"done  {name}: exit {code}, {time.monotonic() - started:.0f} s")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(jobs, len(commands)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


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


def publish(compare_dir: Path, target: Path) -> list[Path]:
    """Copy the commit-ready outputs of ``mbn-compare`` to ``target``: ``table.md``, the PNG plots and
    ``runs.csv`` cut to the varying config keys and the metrics (:func:`compact_runs`).

    Args:
        compare_dir: mbn-compare's ``--out`` dir.
        target: e.g. ``experiments/batch_size_study/results``.
    """
    target.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy2(source, target / source.name))
              for source in [compare_dir / "table.md", *sorted(compare_dir.glob("*.png"))] if source.exists()]
    runs = compact_runs(compare_dir / "runs.csv")
    atomic_write(target / "runs.csv", lambda f: f.write(runs.to_csv(index=False, float_format="%.4f").encode()))
    return [*copied, target / "runs.csv"]


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.batch_size_study.run", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output_root of the study (runs go to OUT/sweeps/<sweep_name>)")
    parser.add_argument("--experiment", default="study_cpu", help="experiment config (default study_cpu)")
    parser.add_argument("--norms", default=",".join(NORM_OVERRIDES), help="comma-separated norms (default bn,gn,brn,mbn)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), type=_int_list,
                        help="comma-separated seeds (default 0,1)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel 1-thread sweeps (default 2)")
    parser.add_argument("--sweep-name", default="study_cpu", help="sweep_name of the experiment (default study_cpu)")
    parser.add_argument("--publish", metavar="DIR", help="copy the table, runs CSV and plots here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--no-compare", action="store_true", help="skip mbn-compare")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. epochs=1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; returns 0 when every chunk and the comparison succeeded."""
    args = build_parser().parse_intermixed_args(argv)
    out = Path(args.out).resolve()
    norms = [n for n in args.norms.split(",") if n]
    try:
        study = chunks(norms, args.seeds)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    commands = {chunk.name: train_command(chunk, args.experiment, out, args.overrides) for chunk in study}
    sweep_dir = out / "sweeps" / args.sweep_name
    compare = compare_command(sweep_dir, out / "compare")
    if args.dry_run:
        for command in [*commands.values(), compare]:
            print(subprocess.list2cmdline(command))
        return 0
    started = time.monotonic()
    codes = run_chunks(commands, args.jobs, out / "logs")
    _say(f"all chunks done in {time.monotonic() - started:.0f} s; exit codes {codes}")
    status = 0 if all(code == 0 for code in codes.values()) else 1
    if args.no_compare:
        return status
    if subprocess.call(compare) != 0:
        return 1
    if args.publish:
        for path in publish(out / "compare", Path(args.publish)):
            _say(f"published {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
