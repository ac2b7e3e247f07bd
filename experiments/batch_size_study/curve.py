"""The fair curve study's tuning rule (EXPERIMENTS.md, "The paper's figure, fairly: protocol"), as code.

Usage::

    python -m experiments.batch_size_study.curve outputs/sweeps/study_curve            # the grids so far
    python -m experiments.batch_size_study.curve outputs/sweeps/study_curve --write experiments/batch_size_study/curve_factors.json

Each norm's lr is ``0.1 x factor x m / 64``. The factor is chosen on the validation split only
(``final_val_acc1`` of seed 0) from the grid 0.3, 1, 3, 10 at m = 2 and m = 32; a best factor at an
edge of the grid asks for the grid extended once on that side (0.1 or 30), and the best of the
extended grid is taken whatever it is. A diverged run scores below every completed one; a grid that
diverged at every factor is extended on its lower side, and if that diverges too the norm has no factor
at that m (no seeds). MBN at m = 32 is BN (lam = 0) and takes BN's factor. At
m = 4, 8, 16 the factor is interpolated linearly in log2 m between the m = 2 and m = 32 factors, in
log, and snapped to the nearest value of the grid (in log). The small-batch peers (EvoNorm-B0/S0, FRN,
MABN, CBN) are tuned the same way and run at m = 2 and 32 only. Ties, which the protocol leaves open, go
to the factor nearer 1 (the linear-scaling rule): between two grid factors of equal validation
accuracy, and between two grid values equally near an interpolated factor. ``--write`` records the chosen factors
of every norm whose grids are complete (a norm's factors never change after: its grids are done); the
runner's ``curve`` study reads them for the seeds' commands of those norms.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mbn.results import copy_results, iter_results, read_results
from mbn.utils.io import atomic_write

GRID = (0.3, 1.0, 3.0, 10.0)
# The one extension of the grid past each edge.
EXTENSION = {0.3: 0.1, 10.0: 30.0}
# optim.base_lr at factor 1 (the linear-scaling rule's lr = 0.1 m / 64).
REFERENCE_LR = 0.1
TUNED_BATCH_SIZES = (2, 32)
CURVE_BATCH_SIZES = (2, 4, 8, 16, 32)
NORMS = ("bn", "gn", "brn", "mbn")
# The small-batch peers, tuned alike, at the tuned batch sizes only (EXPERIMENTS.md, their protocol).
# In order of their pilots' cost per epoch at m = 2, costliest first: a study runs them in this
# order, so the longest commands start first and two processes end close together.
PEERS = ("cbn", "evonorm_b0", "evonorm_s0", "frn", "mabn")
# The norm config option each norm runs as (norm.name -> option).
NORM_OPTIONS = {"bn": "bn", "gn": "gn", "brn": "brn_epochs", "mbn": "mbn", **{peer: peer for peer in PEERS}}
NORM_NAMES = {option: name for name, option in NORM_OPTIONS.items()}
# Seeds per m, paired across norms; MBN at m = 32 is BN and runs one seed to confirm it.
SEEDS = {2: 5, 4: 5, 8: 3, 16: 3, 32: 3}
MBN_SEEDS_AT_32 = 1
METRIC = "final_val_acc1"
FACTORS_FILE = Path(__file__).with_name("curve_factors.json")


def curve_batch_sizes(norm: str) -> tuple[int, ...]:
    """The batch sizes of a norm's curve: every m for BN, GN, BRN and MBN; the tuned ones for a peer."""
    return TUNED_BATCH_SIZES if norm in PEERS else CURVE_BATCH_SIZES


# The score of a grid run that diverged: below every completed run's validation accuracy.
DIVERGED_SCORE = float("-inf")


def factor_of(base_lr: float) -> float:
    """The lr factor of ``optim.base_lr`` (rounded away from float noise: 0.03 / 0.1 is 0.3)."""
    return round(base_lr / REFERENCE_LR, 9)


def base_lr_of(factor: float) -> float:
    """``optim.base_lr`` of a factor, as typed on the command line (0.3 -> 0.03)."""
    return float(f"{factor * REFERENCE_LR:.6g}")


def grid_scores(sweep_dir: str | Path) -> dict[tuple[str, int], dict[float, float]]:
    """``{(norm, m): {factor: final_val_acc1}}`` of the finished seed-0 runs at the tuned m's.

    A run that diverged (a non-finite loss: its record is final, a rerun skips it) scores
    :data:`DIVERGED_SCORE`, below every run that completed: its factor was tried and failed.

    Args:
        sweep_dir: the study's sweep dir (``outputs/sweeps/study_curve``).
    """
    scores: dict[tuple[str, int], dict[float, float]] = {}
    for path in iter_results(sweep_dir):
        record = read_results(path)
        config = record.get("config", {})
        norm, m = config.get("norm", {}).get("name"), config.get("data", {}).get("batch_size")
        if config.get("seed") != 0 or m not in TUNED_BATCH_SIZES:
            continue
        value = record.get("metrics", {}).get(METRIC)
        if record.get("status") == "diverged":
            value = DIVERGED_SCORE
        elif record.get("status") != "completed" or value is None:
            continue
        scores.setdefault((norm, m), {})[factor_of(config["optim"]["base_lr"])] = float(value)
    return scores


@dataclass(frozen=True)
class Tuned:
    """One (norm, m) grid's outcome: the chosen factor, or what is still to run.

    Args:
        factor: the chosen factor, or None while the grid is incomplete or needs its extension.
        missing: grid factors without a completed run.
        extension: the factor to add to the grid (its best is at that edge), or None.
        diverged: every factor of the grid and of its lower extension diverged: the norm has no
            factor at this m, and no seeds to run.
    """

    factor: float | None
    missing: tuple[float, ...] = ()
    extension: float | None = None
    diverged: bool = False


def tune(scores: Mapping[float, float]) -> Tuned:
    """The protocol's choice from one (norm, m) grid's validation accuracies by factor.

    Args:
        scores: ``{factor: final_val_acc1}`` (any subset of the grid and its extensions).
    """
    missing = tuple(f for f in GRID if f not in scores)
    if missing:
        return Tuned(None, missing=missing)
    def rank(factor: float) -> tuple[float, float]:
        # A tie goes to the factor nearer the linear-scaling rule's 1.
        return scores[factor], -abs(math.log(factor))

    best = max(GRID, key=rank)
    if scores[best] == DIVERGED_SCORE:
        # Every factor diverged: a smaller lr is the one remedy, so the lower edge is extended.
        best = min(GRID)
    extension = EXTENSION.get(best)
    if extension is not None:
        if extension not in scores:
            return Tuned(None, extension=extension)
        best = max((*GRID, extension), key=rank)
    if scores[best] == DIVERGED_SCORE:
        return Tuned(None, diverged=True)
    return Tuned(best)


def interpolated_factor(factor_2: float, factor_32: float, m: int) -> float:
    """The factor at ``m``: linear in log2 m between the m = 2 and 32 factors (in log), snapped in log
    to the nearest value of the grid and its extensions.

    Args:
        factor_2: the factor chosen at m = 2.
        factor_32: the factor chosen at m = 32.
        m: a batch size in [2, 32].
    """
    t = (math.log2(m) - 1.0) / 4.0
    log_factor = (1 - t) * math.log(factor_2) + t * math.log(factor_32)
    values = sorted({*GRID, *EXTENSION.values()})
    # A tie (1 and 3 from 1 and 10 at m = 8) goes to the value nearer the linear-scaling rule's factor 1.
    return min(values, key=lambda f: (round(abs(math.log(f) - log_factor), 9), abs(math.log(f))))


def choose_factors(scores: Mapping[tuple[str, int], Mapping[float, float]]) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Every norm's factor at every m of the curve, and what is still to run before they are known.

    Args:
        scores: :func:`grid_scores`.

    Returns:
        ``({norm: {m: factor}}`` for the norms whose grids are complete, and one line per grid still
        to run or extend.
    """
    factors: dict[str, dict[int, float]] = {}
    pending: list[str] = []
    for norm in (*NORMS, *PEERS):
        tuned: dict[int, float] = {}
        for m in TUNED_BATCH_SIZES:
            if norm == "mbn" and m == 32:
                continue  # MBN at m = 32 is BN
            outcome = tune(scores.get((norm, m), {}))
            if outcome.factor is not None:
                tuned[m] = outcome.factor
            elif outcome.diverged:
                pending.append(f"{norm} at m={m}: every factor diverged, the extension too: no factor, no seeds to run")
            elif outcome.extension is not None:
                pending.append(f"{norm} at m={m}: best at the grid's edge, extend with factor {outcome.extension:g} "
                               f"(optim.base_lr={base_lr_of(outcome.extension):g})")
            else:
                pending.append(f"{norm} at m={m}: no completed run yet at factor(s) {', '.join(f'{f:g}' for f in outcome.missing)}")
        if norm == "mbn":
            bn_32 = tune(scores.get(("bn", 32), {})).factor
            if bn_32 is not None:
                tuned[32] = bn_32
        if set(tuned) == set(TUNED_BATCH_SIZES):
            factors[norm] = {m: tuned[m] if m in tuned else interpolated_factor(tuned[2], tuned[32], m) for m in curve_batch_sizes(norm)}
    return factors, pending


def cell_overrides(norm: str, m: int, factor: float) -> tuple[str, str, str]:
    """The ``mbn-train`` overrides of a norm at batch size ``m`` and lr factor ``factor``."""
    return f"norm={NORM_OPTIONS[norm]}", f"data.batch_size={m}", f"optim.base_lr={base_lr_of(factor):g}"


def grid_extensions(sweep_dir: str | Path, cells: Sequence[tuple[str, int]]) -> tuple[tuple[str, ...], ...]:
    """The ``mbn-train -m`` overrides of the extension each of these grids asks for now: one run (seed 0,
    unstacked) at the factor past the edge where its best is (:func:`tune`); none for a grid that is
    incomplete, inner, or extended already.

    Args:
        sweep_dir: the study's sweep dir.
        cells: the grids, as ``(norm name, m)``.
    """
    if not Path(sweep_dir).is_dir():
        return ()  # no grid has run
    scores = grid_scores(sweep_dir)
    extensions = []
    for norm, m in cells:
        extension = tune(scores.get((norm, m), {})).extension
        if extension is not None:
            extensions.append(cell_overrides(norm, m, extension))
    return tuple(extensions)


def seed_sweeps(factors: Mapping[str, Mapping[int, float]]) -> tuple[tuple[str, ...], ...]:
    """The seeds' ``mbn-train -m`` overrides: one command per cell (norm and m), by m, then norm; a
    cell's seeds stacked below m = 32 (at m = 32 stacking loses and runs go one by one).

    One command per cell keeps each command a chunk that ends within a working session (one pack:
    an interrupted pack's checkpoints do not outlive the machine) and lets ``--jobs 2`` balance the
    two processes.

    Args:
        factors: ``{norm: {m: factor}}`` of :func:`choose_factors`.
    """
    order = {norm: index for index, norm in enumerate((*NORMS, *PEERS))}
    cells = sorted(((m, norm, factor) for norm, by_m in factors.items() for m, factor in by_m.items()),
                   key=lambda cell: (cell[0], order[cell[1]]))
    sweeps = []
    for m, norm, factor in cells:
        seeds = MBN_SEEDS_AT_32 if (norm, m) == ("mbn", 32) else SEEDS[m]
        sweep = (*cell_overrides(norm, m, factor), f"seed={','.join(str(s) for s in range(seeds))}")
        sweeps.append(sweep + ((f"stack={seeds}",) if m < 32 and seeds > 1 else ()))
    return tuple(sweeps)


def is_grid_run(config: Mapping[str, Any]) -> bool:
    """Whether a run's config is one of the lr grids' (seed 0 at a tuned batch size, any factor)."""
    return config.get("seed") == 0 and config.get("data", {}).get("batch_size") in TUNED_BATCH_SIZES


def at_chosen_factor(factors: Mapping[str, Mapping[int, float]]) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a run's config is one of the curve's (its norm and m at the chosen factor, any seed).

    Args:
        factors: ``{norm: {m: factor}}`` (:func:`read_factors`).
    """
    def chosen(config: Mapping[str, Any]) -> bool:
        norm, m = config.get("norm", {}).get("name"), config.get("data", {}).get("batch_size")
        return norm in factors and m in factors[norm] and factor_of(config["optim"]["base_lr"]) == factors[norm][m]
    return chosen


def select_runs(sweep_dir: str | Path, target: str | Path, keep: Callable[[Mapping[str, Any]], bool]) -> list[Path]:
    """Copy the records of the runs a table reads to ``target/<run dir>/results.json``, for
    mbn-compare: the study's sweep dir holds the grids' runs and the seeds' together.

    Args:
        sweep_dir: the study's sweep dir.
        target: a dir that holds only the selection (emptied of earlier records first).
        keep: which runs, by their config (:func:`at_chosen_factor`, :func:`is_grid_run`).

    Returns:
        The copied records.
    """
    target = Path(target)
    for stale in iter_results(target) if target.is_dir() else ():
        stale.unlink()
    return copy_results(sweep_dir, target, keep=lambda record: keep(record.get("config", {})))


def read_factors(path: str | Path = FACTORS_FILE) -> dict[str, dict[int, float]] | None:
    """The chosen factors written by ``--write`` (``{norm: {m: factor}}``), or None when not chosen yet."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return {norm: {int(m): float(f) for m, f in by_m.items()} for norm, by_m in data["factors"].items()}


def grid_table(scores: Mapping[tuple[str, int], Mapping[float, float]]) -> str:
    """The grids' validation accuracies as a markdown table (rows norm and m, columns factor)."""
    factors = sorted({*GRID, *(f for by_factor in scores.values() for f in by_factor)})
    lines = ["| norm | m | " + " | ".join(f"x{f:g}" for f in factors) + " |", "|:--|--:|" + "--:|" * len(factors)]
    for (norm, m) in sorted(scores, key=lambda key: (NORMS.index(key[0]) if key[0] in NORMS else 99, key[1])):
        cells = [("diverged" if scores[norm, m][f] == DIVERGED_SCORE else f"{100 * scores[norm, m][f]:.2f}")
                 if f in scores[norm, m] else "" for f in factors]
        lines.append(f"| {norm} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the grids and the chosen factors; ``--write`` records those of every norm whose grids are complete.

    Returns:
        0 when every norm's factors are chosen, 1 while grids are still to run or extend.
    """
    parser = argparse.ArgumentParser(prog="python -m experiments.batch_size_study.curve", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="the study's sweep dir (outputs/sweeps/study_curve)")
    parser.add_argument("--write", metavar="JSON", help="record the chosen factors here (the norms whose grids are complete)")
    args = parser.parse_args(argv)
    scores = grid_scores(args.sweep_dir)
    print(f"{METRIC} (%) of seed 0 by lr factor (lr = 0.1 x factor x m / 64):\n\n{grid_table(scores)}\n")
    factors, pending = choose_factors(scores)
    for norm, by_m in factors.items():
        print(f"{norm}: " + ", ".join(f"m={m} x{f:g}" for m, f in by_m.items()))
    for line in pending:
        print(f"still to run: {line}")
    if args.write and factors:
        content = {"metric": METRIC, "reference_lr": REFERENCE_LR, "grid_scores": {f"{n}@{m}": {f"{f:g}": "diverged" if v == DIVERGED_SCORE else v for f, v in s.items()} for (n, m), s in sorted(scores.items())},
                   "factors": {norm: {str(m): f for m, f in by_m.items()} for norm, by_m in factors.items()}}
        atomic_write(Path(args.write), lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))
        print(f"wrote {args.write} ({', '.join(factors)})")
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
