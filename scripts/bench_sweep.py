"""Sweep wall time with parallel jobs on one machine: ``hydra/launcher=joblib`` with n_jobs=2 vs 1.

The same 4-run sweep (seeds 0-3 of a narrow ResNet-18 with BN on a slice of the real CIFAR-10
archive) runs with each ``n_jobs`` into its own fresh output dir, through the real ``mbn-train -m``
command in a subprocess. Threads are left to mbn-train's pinning (``torch.set_num_threads =
cores // n_jobs``), so both sides use all cores and do the same total work. The archive is decoded
into the dataset cache before timing. Prints each wall time, the load average around it, and the
ratio; every run must complete.

    python scripts/bench_sweep.py [--width 8] [--train-subset 6000] [--batch-size 8] [--runs 4]
    python scripts/bench_sweep.py --stack 4 --runs 8 --batch-size 2 --width 16 --train-subset 2000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mbn.data import load_dataset
from mbn.results import iter_results, read_results

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def sweep_command(output_root: Path, n_jobs: int, args: argparse.Namespace, stack: int = 1) -> list[str]:
    seeds = ",".join(str(seed) for seed in range(args.runs))
    # W&B start-up costs seconds per run and is not what is compared: both sides log CSV only.
    loggers = ["logger=[csv]", f"stack={stack}"] if args.stack > 1 else []
    return [
        sys.executable, "-m", "mbn.cli.train", "-m",
        "data=cifar10_archive", f"data.source.archive={args.archive}",
        f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}",
        f"data.batch_size={args.batch_size}", "data.eval_batch_size=500",
        "model=resnet18", f"model.width={args.width}", "norm=bn", f"epochs={args.epochs}",
        f"seed={seeds}", "sweep_name=bench", f"output_root={output_root}",
        "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", *loggers,
    ]


def timed_sweep(n_jobs: int, workdir: Path, args: argparse.Namespace, stack: int = 1) -> tuple[float, tuple[float, float]]:
    output_root = workdir / f"n_jobs_{n_jobs}_stack_{stack}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(sweep_command(output_root, n_jobs, args, stack), env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    sweep_dir = output_root / "sweeps" / "bench"
    results = [read_results(path) for path in iter_results(sweep_dir)] if sweep_dir.is_dir() else []
    if proc.returncode != 0 or len(results) != args.runs or any(r["status"] != "completed" for r in results):
        raise SystemExit(f"sweep with n_jobs={n_jobs} did not complete (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    threads = sorted({a["num_threads"] for r in results for a in r["attempts"]})
    print(f"n_jobs={n_jobs}, stack={stack}: {elapsed:6.1f} s wall for {args.runs} runs (threads per job {threads}; "
          f"1-min load {load_before:.2f} before, {load_after:.2f} after)", flush=True)
    return elapsed, (load_before, load_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--train-subset", type=int, default=6000)
    parser.add_argument("--test-subset", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--stack", type=int, default=1,
                        help="K > 1: compare 2 jobs x 1 run with 2 jobs x stack K (both n_jobs=2, --runs seeds)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; sweep of {args.runs} runs: resnet18 width {args.width}, m={args.batch_size}, "
          f"{args.train_subset} CIFAR-10 training images, {args.epochs} epoch(s)", flush=True)
    # Decode the archive into the dataset cache first, so that neither side pays for it.
    load_dataset("cifar10_archive", archive=str(args.archive))
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as workdir:
        if args.stack > 1:
            single, _ = timed_sweep(2, Path(workdir), args)
            stacked, _ = timed_sweep(2, Path(workdir), args, stack=args.stack)
            print(f"speed-up of 2 jobs x stack {args.stack} over 2 jobs x 1 run: {single / stacked:.2f}x "
                  f"(wall time ratio stack=1 / stack={args.stack})", flush=True)
            return
        serial, _ = timed_sweep(1, Path(workdir), args)
        parallel, _ = timed_sweep(2, Path(workdir), args)
    print(f"speed-up of 2 parallel jobs over 1: {serial / parallel:.2f}x (wall time ratio n_jobs=1 / n_jobs=2)", flush=True)


if __name__ == "__main__":
    main()
