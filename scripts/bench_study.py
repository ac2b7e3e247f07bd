"""What a CPU study costs: every cell of its commands timed briefly, projected to the whole study.

For each ``mbn-train -m`` command of a study (``experiments.batch_size_study.run``), the script expands
its sweep into packs as the CLI does (the jobs along the pack key, seed or optim.base_lr, in chunks of
``stack``; one pack per other combination), times each distinct pack (norm, m, members, lr grid or
seeds) for a few training steps (forward, loss, backward and SGD, one stacked model for K members,
as mbn-train trains them) and one evaluation batch per member, and projects a pack's wall time to
the experiment's epochs, training images and evaluation images. A command's packs run ``n_jobs`` at
a time (the joblib launcher's; longest first); the study's commands one after another. Next to each
command, the measured wall time when the study's sweep dir holds its runs (a pack's: its slowest
member's seconds over all its attempts; scheduled the same way), so projection and measurement read alike.

    python scripts/bench_study.py --study curve_grid             # the fair curve study's lr grids
    python scripts/bench_study.py --study trained --steps 30     # the powered study, with its measured times
    python scripts/bench_study.py --study curve_grid --only 1    # one command
    python scripts/bench_study.py --study curve --measured-only  # the curve's seeds: measured times only

The steps are timed on this process alone (1 thread): with two study processes on 2 cores each gets
about one core, so the projection is per process and the schedule supplies the parallelism.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ beside mbn/, run from anywhere

from bench_stack import build, make_separate_step, make_stacked_step, time_steps  # noqa: E402 (scripts/ is on sys.path)

from experiments.batch_size_study import run as runner  # noqa: E402
from experiments.batch_size_study.curve import FACTORS_FILE, read_factors  # noqa: E402
from mbn.models import stack  # noqa: E402
from mbn.results import iter_results, read_results, total_wall_time  # noqa: E402

PACK_KEYS = ("seed", "optim.base_lr", "optim.weight_decay")
# A norm config option that runs another norm's layer (its ramps in epochs change nothing per step).
LAYER_OF_OPTION = {"brn_epochs": "brn"}


@dataclass(frozen=True)
class Pack:
    """One process of a command: ``members`` runs of one norm and m, stacked when more than one."""

    norm: str
    batch_size: int
    members: int
    lr_grid: bool
    values: tuple[tuple[str, str], ...]  # the pack's overrides (key, value), to find its records


def expand(sweep: tuple[str, ...]) -> list[Pack]:
    """The packs of one command's overrides, as mbn-train's sweep forms them."""
    swept = {key: value.split(",") for key, _, value in (o.partition("=") for o in sweep)}
    stack_size = int(swept.pop("stack", ["1"])[0])
    key = next((k for k in PACK_KEYS if len(swept.get(k, [])) > 1), None)
    along = swept.pop(key) if key else [None]
    others = [dict(zip(swept, combo)) for combo in itertools.product(*swept.values())]
    packs = []
    for combo in others:
        for start in range(0, len(along), stack_size if key else 1):
            chunk = along[start : start + stack_size]
            values = tuple(sorted(combo.items())) + ((key, ",".join(chunk)),) if key else tuple(sorted(combo.items()))
            packs.append(Pack(combo.get("norm", "bn"), int(combo["data.batch_size"]), len(chunk), key == "optim.base_lr" and len(chunk) > 1, values))
    return packs


def time_pack(pack: Pack, width: int, eval_batch_size: int, steps: int) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated image and member) of a pack."""
    device = torch.device("cpu")
    layer = LAYER_OF_OPTION.get(pack.norm, pack.norm)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(pack.batch_size, 3, 32, 32, generator=generator) for _ in range(pack.members)]
    labels = [torch.randint(0, 10, (pack.batch_size,), generator=generator) for _ in range(pack.members)]
    models = [build(layer, width, seed, device) for seed in range(pack.members)]
    if pack.members == 1:
        model, step = models[0], make_separate_step(models, images, labels)
    else:
        model = stack(models)
        step = make_stacked_step(model, images, labels, pack.lr_grid)
    time_steps(step, 3, device)  # warm-up: allocator, MBN's first step
    per_step = statistics.median(time_steps(step, max(1, steps // 3), device) / max(1, steps // 3) for _ in range(3))
    model.eval()
    batch = torch.randn(eval_batch_size, 3 * pack.members, 32, 32, generator=generator)  # (m, K * c, H, W), as stacked loaders yield
    with torch.no_grad():
        model(batch)
        started = time.perf_counter()
        F.log_softmax(model(batch), dim=-1)
        per_image = (time.perf_counter() - started) / (eval_batch_size * pack.members)
    model.train()
    return per_step, per_image


def schedule(durations: list[float], workers: int) -> float:
    """Wall time of jobs on ``workers`` processes, longest first, each to the first free worker."""
    free = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        free[free.index(min(free))] += duration
    return max(free)


def measured_pack(pack: Pack, records: list[dict]) -> float | None:
    """The slowest member's seconds over all its attempts (:func:`mbn.results.total_wall_time`) among the
    runs ``pack``'s command trained; None until every member has a finished record (completed, or
    diverged: a sweep keeps both as final, :func:`runner.is_finished`).

    A member whose config another command trained first (the curve study's seed 0 is its lr grid's run)
    is complete but costs this command nothing: a record counts as this command's when its overrides set
    every key the pack's do. 0.0 when no member was trained here.
    """
    wanted = {"seed": ["0"]}  # the experiments' seed when a command sweeps none
    for key, value in pack.values:
        wanted[key] = value.split(",")
    found = []
    for record in records:
        config = record.get("flat", {})
        if all(any(_same(config.get(key if key != "norm" else "norm.name"), v) for v in values) for key, values in wanted.items()):
            found.append(record)
    if len(found) < pack.members or not all(runner.is_finished(r) for r in found):
        return None
    keys = {key for key, _ in pack.values}
    here = [r for r in found if "overrides" not in r  # a record that does not say: this command's
            or keys <= {str(o).partition("=")[0].lstrip("+") for o in r["overrides"] or ()}]
    return max((total_wall_time(r) or 0.0 for r in here), default=0.0)


def _same(found: object, typed: str) -> bool:
    typed = LAYER_OF_OPTION.get(typed, typed)
    try:
        return math.isclose(float(found), float(typed))
    except (TypeError, ValueError):
        return str(found) == typed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted([*runner.STUDIES, "curve"]), default="curve_grid",
                        help="curve: the fair curve study's seeds at the factors in curve_factors.json")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per pack (3 blocks, median)")
    parser.add_argument("--only", type=int, nargs="+", metavar="N", help="only these commands (1-based)")
    parser.add_argument("--sweep-dir", type=Path, help="the study's sweep dir for measured times (default: the runner's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measured-only", action="store_true", help="time nothing: the measured times only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.study == "curve":
        factors = read_factors()
        if factors is None:
            parser.error(f"the curve study's factors are not chosen yet ({FACTORS_FILE} is missing)")
        study = runner.curve_study(factors)
    else:
        study = runner.STUDIES[args.study]
    config = _experiment_config(study.experiment)
    epochs, data = config["epochs"], config["data"]
    width, n_jobs = config["model"]["width"], 2
    eval_images = (data.get("val_subset") or 0) + (data.get("test_subset") or 0)
    sweep_dir = args.sweep_dir or runner.sweep_dir_of(study, None)
    records = _records(sweep_dir)
    print(f"# bench_study  {datetime.datetime.now().isoformat(timespec='seconds')}  study {args.study} ({study.experiment})")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}; {epochs} epochs, {data['train_subset']} training and {eval_images} evaluation "
          f"images, width {width}, {n_jobs} processes at a time; measured from {sweep_dir} ({len(records)} records)")
    print(f"{'cmd':>3} {'norm':>10} {'m':>3} {'K':>2} {'grid':>4} {'ms/step':>8} {'s/epoch':>8} {'proj min':>9} {'meas min':>9}")
    total_projected, total_measured, total_process, complete = 0.0, 0.0, 0.0, True
    timed: dict[tuple, tuple[float, float]] = {}
    for number, sweep in enumerate(study.sweeps, start=1):
        if args.only and number not in args.only:
            continue
        packs = expand(sweep)
        projected, measured = [], []
        for pack in packs:
            cell = (pack.norm, pack.batch_size, pack.members, pack.lr_grid)
            if cell not in timed and not args.measured_only:
                timed[cell] = time_pack(pack, width, data["eval_batch_size"], args.steps)
            per_step, per_image = timed.get(cell, (math.nan, math.nan))
            epoch_s = data["train_subset"] // pack.batch_size * per_step + eval_images * pack.members * per_image
            projected.append(epochs * epoch_s)
            measured.append(measured_pack(pack, records))
            seen = measured[-1]
            print(f"{number:>3} {pack.norm:>10} {pack.batch_size:>3} {pack.members:>2} {'lr' if pack.lr_grid else '':>4} "
                  f"{_shown(1000 * per_step):>8} {_shown(epoch_s):>8} {_shown(projected[-1] / 60):>9} "
                  f"{'' if seen is None else f'{seen / 60:.1f}':>9}", flush=True)
        command_projected = schedule(projected, n_jobs)
        total_projected += command_projected
        if all(m is not None for m in measured):
            done = [m for m in measured if m is not None]
            command_measured = schedule(done, n_jobs)
            total_measured += command_measured
            total_process += sum(done)
            shown = f"{command_measured / 60:.1f} min ({sum(done) / 60:.1f} process-min)"
        else:
            complete, shown = False, "-"
        print(f"{number:>3} command: projected {_shown(command_projected / 60)} min, measured {shown}: "
              f"{runner.shown(['mbn-train', '-m', f'experiment={study.experiment}', *sweep])}")
    print(f"# study projected {_shown(total_projected / 3600, 2)} h; measured "
          + (f"{total_measured / 3600:.2f} h ({total_process / 3600:.2f} process-hours)" if complete
             else "(not every command has run)"))
    return 0


def _shown(value: float, decimals: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{decimals}f}"


def _experiment_config(experiment: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import mbn.cli.schema  # noqa: F401 (registers the config schemas)
    from mbn.cli.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", "paths.data_root=."])
    return OmegaConf.to_container(cfg, resolve=False)


def _records(sweep_dir: Path) -> list[dict]:
    from mbn.results import flatten

    if not sweep_dir.is_dir():
        return []
    records = []
    for path in iter_results(sweep_dir):
        record = read_results(path)
        record["flat"] = flatten(record.get("config", {}))
        records.append(record)
    return records


if __name__ == "__main__":
    sys.exit(main())
