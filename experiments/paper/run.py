"""The paper's small-batch comparisons at full scale (GPU), one command per table or figure.

Usage::

    python -m experiments.paper.run cifar10 --out outputs/paper            # table: CIFAR-10
    python -m experiments.paper.run cifar100 --out outputs/paper           # table: CIFAR-100
    python -m experiments.paper.run curves_cifar100 --out outputs/paper    # figure: curves at m=2
    python -m experiments.paper.run cifar10 --out outputs/paper --dry-run  # print the commands
    python -m experiments.paper.run cifar10 --out outputs/paper -- hydra/launcher=joblib

Each target runs one ``mbn-train -m`` sweep per model over ``configs/experiment/paper_<dataset>.yaml``
(BN/GN/BRN/MBN x m in {2, 4, 8, 16, 32}, 200 epochs, the paper's recipe) with its own
``sweep_name`` (``paper_<dataset>_<model>``), then ``mbn-compare`` over those sweeps into
``<out>/compare/<target>`` (table with one row per norm and model, accuracy-vs-m plot, per-epoch
curves, report.html). Sweeps skip completed runs and resume interrupted ones, so rerunning a target
continues it, and targets sharing sweeps (``curves_cifar100`` reuses ``cifar100``'s ResNet-18 runs)
train nothing twice. Overrides after ``--`` go to every ``mbn-train`` call (a launcher, ``trainer=ddp``, ...).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# ResNet-18/34/50 and VGG (the paper's CIFAR networks); configs/model/vgg16.yaml is the other VGG.
PAPER_MODELS = ("resnet18", "resnet34", "resnet50", "vgg11")
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Target:
    """One table or figure of the paper.

    Args:
        name: the command-line name.
        dataset: ``cifar10`` or ``cifar100`` (selects ``configs/experiment/paper_<dataset>.yaml``).
        models: model configs, one sweep each.
        description: what the target reproduces.
        curve_batch_size: batch size of the per-epoch plot; None = mbn-compare's default (the smallest m).
    """

    name: str
    dataset: str
    models: tuple[str, ...]
    description: str
    curve_batch_size: int | None = None

    @property
    def experiment(self) -> str:
        return f"paper_{self.dataset}"

    def sweep_name(self, model: str) -> str:
        return f"paper_{self.dataset}_{model}"


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("cifar10", "cifar10", PAPER_MODELS,
               "Table: CIFAR-10 test accuracy, BN/GN/BRN/MBN x m in {2..32}, ResNet-18/34/50 and VGG11"),
        Target("cifar100", "cifar100", PAPER_MODELS,
               "Table: CIFAR-100 test accuracy, BN/GN/BRN/MBN x m in {2..32}, ResNet-18/34/50 and VGG11"),
        Target("curves_cifar100", "cifar100", ("resnet18",),
               "Figure: CIFAR-100 ResNet-18 training/test curves of every norm at m=2", curve_batch_size=2),
    )
}


def train_commands(target: Target, output_root: str | Path, seeds: Sequence[int], extra: Sequence[str] = ()) -> list[list[str]]:
    """The ``mbn-train -m`` commands of a target, one per model.

    Args:
        target: the table or figure.
        output_root: ``output_root`` of the runs (sweeps go to ``<output_root>/sweeps/<sweep_name>``).
        seeds: seeds of every cell.
        extra: further Hydra overrides for every run.
    """
    if not seeds:
        raise ValueError("seeds: need at least one seed")
    seed_list = ",".join(str(int(seed)) for seed in seeds)
    return [
        [sys.executable, "-m", "mbn.cli.train", "-m", f"experiment={target.experiment}", f"model={model}",
         f"sweep_name={target.sweep_name(model)}", f"seed={seed_list}", f"output_root={output_root}", *extra]
        for model in target.models
    ]


def compare_command(target: Target, output_root: str | Path) -> list[str]:
    """The ``mbn-compare`` command of a target, over all of its sweeps.

    Args:
        target: the table or figure.
        output_root: ``output_root`` of the runs.
    """
    root = Path(output_root)
    command = [sys.executable, "-m", "mbn.cli.compare",
               *(str(root / "sweeps" / target.sweep_name(model)) for model in target.models),
               "--out", str(root / "compare" / target.name), "--format", "markdown"]
    if target.curve_batch_size is not None:
        command += ["--curve-batch-size", str(target.curve_batch_size)]
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.paper.run",
        description="Run one of the paper's small-batch comparisons (sweeps, then mbn-compare).",
        epilog="targets: " + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()),
    )
    parser.add_argument("target", choices=sorted(TARGETS), help="table or figure to reproduce")
    parser.add_argument("--out", default="outputs/paper", help="output_root of the runs (default outputs/paper)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        type=lambda text: [int(part) for part in text.split(",") if part],
                        help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a target; returns 0 when every sweep and the comparison succeeded, else the first failing exit code."""
    args = build_parser().parse_intermixed_args(argv)
    target = TARGETS[args.target]
    output_root = Path(args.out).resolve()
    commands = [*train_commands(target, output_root, args.seeds, args.overrides), compare_command(target, output_root)]
    if args.dry_run:
        for command in commands:
            print(subprocess.list2cmdline(command))
        return 0
    status = 0
    for command in commands:
        print("+ " + subprocess.list2cmdline(command), flush=True)
        code = subprocess.call(command)
        # A failed run still leaves the others' results: compare what is there, report the failure.
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
