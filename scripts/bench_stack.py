"""Training throughput of K stacked runs (mbn.models.stack) against the same K runs stepped one by one.

For each width, norm, batch size m and stack size K, side by side in one process: K separate
ResNet-18s (CIFAR stem, seeds 0..K-1, each with its own SGD) take one training step each, one
after another; one stacked model of the same K runs takes one step. A step is forward,
cross-entropy (the sum of the members' losses for the stack), backward and an SGD step
(momentum 0.9, weight decay 5e-4). Throughput is images per second summed over the K runs
(``K * m`` images per step). Every round times a block of stacked steps and a block of separate
steps back to back, alternating which goes first; the ratio (stacked / separate throughput) is
the median of the per-round ratios, so slow drift of a shared machine cancels. MBN runs
mid-schedule (epoch 5 of 10, ``m0 = 32``): ``lam > 0`` at m < 32.

    python scripts/bench_stack.py                                  # all defaults, CPU, 1 thread
    python scripts/bench_stack.py --widths 64 --batch-sizes 2 32 --stacks 4 --steps 8
    python scripts/bench_stack.py --device cuda --threads 0        # unchanged on a GPU
    python scripts/bench_stack.py --device cuda --batch-sizes 2 --stacks 1 4 --json stack.json
    python scripts/bench_stack.py --lr-grid --batch-sizes 2 8 --stacks 4     # an lr grid of 4 (MemberSGD)
    python scripts/bench_stack.py --conv-path auto                 # each conv's path from the stack probe
    python scripts/bench_stack.py --stack-auto --stacks 2 4 8      # K jobs as stack=auto trains them

``--conv-path`` sets how the stacked convolutions compute (StackedConv2d.path): ``grouped`` (one
grouped convolution, the default), ``dense`` (one convolution per member) or ``auto`` (each layer's
faster path from :func:`mbn.models.stack_probe.probe_stack`, as ``stack=auto`` trains; the probe is
cached under ``$MBN_CACHE_DIR``; ``probe`` is then the probe's own speedup and ``dense`` how many
convolutions it put on the dense path).

``--stack-auto`` benchmarks what ``mbn-train -m ... stack=auto`` does with a sweep of K jobs of a
cell: :func:`mbn.models.stack_probe.choose_stack_size` picks K' (1, 2, 4 or 8, at most K) from the
probes and each convolution's path from K''s probe; the ratio is then K' stacked members against K'
separate runs (the sweep trains its K jobs as packs of K'), and exactly 1 where K' = 1, as the sweep
then trains every job alone, which is the unstacked sweep itself (not timed). ``auto K`` is K';
``projected speed by K`` is the planner's projection for each K it considered (K jobs in packs of that
K, against unstacked), from the probes.

On a GPU every timed block starts and ends with a device synchronization, and the peak GPU memory
allocated by PyTorch is printed at the end. ``--json PATH`` also writes the table (and that peak) as JSON.

Target of issue 10: at m = 2, K = 4 at least 1.6x the throughput of separate runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mbn.models import MemberSGD, build_model, member_cross_entropy, set_conv_paths, stack
from mbn.models.stack_probe import StackProbe, choose_stack_size, probe_stack
from mbn.nn import norm_layer, schedule, set_progress

EPOCH, TOTAL_EPOCHS = 5, 10  # MBN mid-schedule
# GN and EvoNorm-S0 with GN's width-scaled groups at width 16; MABN and CBN past their warmup / burn-in
# (the steady state that most of a run's steps take), as scripts/bench_norms.py.
NORM_KWARGS = {"mbn": {"ideal_batch_size": 32}, "gn": {"num_groups": 8}, "evonorm_s0": {"num_groups": 8},
               "mabn": {"warmup_steps": 0, "renorm_warmup_steps": 0}, "cbn": {"burnin_steps": 0}}
SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}


def build(norm: str, width: int, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=10, norm_layer=norm_layer(norm, **NORM_KWARGS.get(norm, {})), width=width)
    set_progress(model, EPOCH, TOTAL_EPOCHS)
    return model.to(device)


def lr_factors(members: int, lr_grid: bool) -> list[float]:
    """Each member's lr as a factor of SGD's: 1 for seeds; for an lr grid, 3x apart (1, 3, 9, ...)."""
    return [3.0 ** k if lr_grid else 1.0 for k in range(members)]


def make_separate_step(models: list[nn.Module], images: list[torch.Tensor], labels: list[torch.Tensor],
                       lr_grid: bool = False) -> Callable[[], None]:
    factors = lr_factors(len(models), lr_grid)
    optimizers = [torch.optim.SGD(model.parameters(), **{**SGD, "lr": SGD["lr"] * factor}) for model, factor in zip(models, factors)]

    def step() -> None:
        for model, optimizer, x, y in zip(models, optimizers, images, labels):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    return step


def make_stacked_step(stacked: nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor],
                      lr_grid: bool = False) -> Callable[[], None]:
    if lr_grid:  # each member at its own lr: MemberSGD, as mbn-train's stacked lr grids train
        members = len(images)
        optimizer: torch.optim.Optimizer = MemberSGD(
            stacked.parameters(), num_members=members, lr=SGD["lr"], member_lr_scale=lr_factors(members, True),
            member_weight_decay=[SGD["weight_decay"]] * members, momentum=SGD["momentum"])
    else:
        optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    x, y = torch.cat(images, 1), torch.stack(labels, 1)  # what StackedBatchLoader yields

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        member_cross_entropy(stacked(x), y).sum().backward()
        optimizer.step()

    return step


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(width: int, norm: str, batch_size: int, members: int, args: argparse.Namespace, device: torch.device) -> dict[str, float | None]:
    def probe(num_members: int) -> StackProbe:
        return probe_stack("resnet18", width=width, norm=norm, batch_size=batch_size, num_members=num_members,
                           norm_options=NORM_KWARGS.get(norm, {}), image_shape=(3, args.image_size, args.image_size),
                           device=device)

    chosen, projected = None, None
    if args.stack_auto:
        chosen, projected, probes = choose_stack_size(members, probe)
        if chosen == 1:  # the sweep trains every job alone: the unstacked sweep itself
            return {"separate": None, "stacked": None, "ratio": 1.0, "probe_speedup": 1.0, "dense_convs": None, "auto_stack": 1,
                    "projected": projected}
        members, conv_probe = chosen, probes[chosen]
    elif args.conv_path == "auto":
        conv_probe = probe(members)
    else:
        conv_probe = None
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(batch_size, 3, args.image_size, args.image_size, generator=generator).to(device) for _ in range(members)]
    labels = [torch.randint(0, 10, (batch_size,), generator=generator).to(device) for _ in range(members)]
    separate_models = [build(norm, width, seed, device) for seed in range(members)]
    stacked = stack([build(norm, width, seed, device) for seed in range(members)])
    set_conv_paths(stacked, conv_probe.conv_paths if conv_probe is not None else args.conv_path)
    steps = {"separate": make_separate_step(separate_models, images, labels, args.lr_grid),
             "stacked": make_stacked_step(stacked, images, labels, args.lr_grid)}
    for step in steps.values():  # allocator, MBN's momentum initialization (first step has lam = 0)
        time_steps(step, args.warmup, device)
    per_round = max(1, args.steps // args.rounds)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = ["stacked", "separate"] if round_index % 2 == 0 else ["separate", "stacked"]
        for name in order:
            seconds[name].append(time_steps(steps[name], per_round, device))
    images_per_round = members * batch_size * per_round
    return {
        "separate": images_per_round * args.rounds / sum(seconds["separate"]),
        "stacked": images_per_round * args.rounds / sum(seconds["stacked"]),
        "ratio": statistics.median(s / t for s, t in zip(seconds["separate"], seconds["stacked"])),
        "probe_speedup": None if conv_probe is None else conv_probe.speedup,
        "dense_convs": None if conv_probe is None else sum(path == "dense" for path in conv_probe.conv_paths.values()),
        "auto_stack": chosen,
        "projected": projected,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 2, 4, 8], help="K, runs per stack")
    parser.add_argument("--norms", nargs="+", default=["bn", "mbn"], choices=["bn", "gn", "brn", "mbn", "none"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant, split into --rounds blocks")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds per setup")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 = leave torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device of the models and batches, e.g. cuda")
    parser.add_argument("--lr-grid", action="store_true",
                        help="the K runs are one seed's lr grid (lrs 3x apart): separate SGDs vs one MemberSGD")
    parser.add_argument("--conv-path", choices=["grouped", "dense", "auto"], default="grouped",
                        help="the stacked convolutions' path (auto: each layer's faster one, from the stack probe)")
    parser.add_argument("--stack-auto", action="store_true",
                        help="K jobs as stack=auto trains them: the probe's K' <= K and conv paths (1: unstacked, ratio 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table and the peak GPU memory as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# bench_stack  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# command: python scripts/bench_stack.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(
        f"# torch {torch.__version__}, python {platform.python_version()}, {where}, ResNet-18 (CIFAR stem), "
        f"{args.image_size}x{args.image_size} inputs, {args.steps} timed steps in {args.rounds} rounds after {args.warmup} warm-up"
    )
    lams = ", ".join(f"m={m}: lam={schedule.lam(EPOCH, TOTAL_EPOCHS, m, 32):.3f}" for m in args.batch_sizes)
    print(f"# mbn: m0=32, epoch {EPOCH}/{TOTAL_EPOCHS} ({lams})")
    print("# img/s = images per second summed over the K runs; ratio = stacked / separate throughput")
    probed = args.stack_auto or args.conv_path == "auto"
    if args.stack_auto:
        print("# stack=auto: K' (auto K) and each conv's path from the stack probe; K' = 1 trains the K jobs unstacked (ratio 1, not timed)")
    else:
        print(f"# stacked convolutions: {args.conv_path} path")
    probe_columns = (f" {'auto K':>6}" if args.stack_auto else "") + (f" {'probe':>6} {'dense':>5}" if probed else "") + (
        "  projected speed by K" if args.stack_auto else "")
    print(f"{'width':>5} {'norm':>4} {'m':>3} {'K':>2} {'separate img/s':>14} {'stacked img/s':>13} {'ratio':>6}{probe_columns}")
    rows = []
    for width in args.widths:
        for norm in args.norms:
            for batch_size in args.batch_sizes:
                for members in args.stacks:
                    row = bench(width, norm, batch_size, members, args, device)
                    rows.append({"width": width, "norm": norm, "batch_size": batch_size, "stack": members,
                                 "separate_img_per_s": row["separate"], "stacked_img_per_s": row["stacked"], "ratio": row["ratio"],
                                 "conv_path": "auto" if args.stack_auto else args.conv_path, "auto_stack": row["auto_stack"],
                                 "probe_speedup": row["probe_speedup"], "dense_convs": row["dense_convs"],
                                 "projected_speed": row["projected"]})
                    columns = (f" {row['auto_stack']:>6}" if args.stack_auto else "") + (
                        f" {row['probe_speedup']:>6.2f} {_text(row['dense_convs']):>5}" if probed else "") + (
                        "  " + " ".join(f"{size}:{speed:.2f}" for size, speed in row["projected"].items()) if args.stack_auto else "")
                    print(
                        f"{width:>5} {norm:>4} {batch_size:>3} {members:>2} {_text(row['separate'], '.1f'):>14} "
                        f"{_text(row['stacked'], '.1f'):>13} {row['ratio']:>6.2f}{columns}",
                        flush=True,
                    )
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if peak_mib is not None:
        print(f"# peak GPU memory allocated: {peak_mib:.1f} MiB")
    if args.json is not None:
        record = {"device": str(device), "rows": rows, "peak_gpu_memory_allocated_mib": peak_mib}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


def _text(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
