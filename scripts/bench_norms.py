"""Side-by-side speed of the normalization layers in a ResNet-18 (width 16, CIFAR-style stem), CPU or GPU.

Prints, per batch size, the median training-step time (forward + backward + SGD step) and eval-step
time (no-grad forward) of each norm, and its ratio to nn.BatchNorm2d. Ratios are the median of
per-round ratios: every round times each norm back to back (in rotating order), so slow drift of a
shared machine cancels. MBN runs mid-schedule (epoch 5 of 10), so at batch 2 lam > 0.

Target of issue 2: MBN/BN training ratio <= 1.10 at batch sizes 2 and 32, eval ratio <= 1.02.

    python scripts/bench_norms.py                 # defaults used in BENCHMARKS.md
    python scripts/bench_norms.py --threads 2 --rounds 20
    TORCHINDUCTOR_COMPILE_THREADS=1 python scripts/bench_norms.py --compile --norms bn mbn
    python scripts/bench_norms.py --norms bn mbn --batch-sizes 2 --profile 200   # torch.profiler's top ops
    python scripts/bench_norms.py --device cuda --norms bn mbn --json norms.json

``--device cuda`` times float32 eager steps on the GPU, synchronizing before and after every timed
block (CUDA kernels run asynchronously), and prints the peak GPU memory allocated by PyTorch.
``--json PATH`` also writes the table (and that peak) as JSON.

``--compile`` times ``torch.compile(model)`` (inductor; the SGD step stays eager) for every norm that
compiles once (not BRN, MABN, CBN: they would recompile every step, ``mbn.train.spec.NormSpec.RECOMPILES_EACH_STEP``) and
prints the one-off compile time of each (first two training / eval steps) as comment lines. Only a
first run compiles cold: inductor caches compiled graphs on disk (``/tmp/torchinductor_$USER``).
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

import torch
from torch import nn

from mbn.models import build_model
from mbn.nn import NORM_NAMES, norm_layer, schedule, set_progress
from mbn.train.spec import NORM_SCHEMAS

EPOCH, TOTAL_EPOCHS = 5, 10  # MBN mid-schedule


def norm_kwargs(norm: str, args: argparse.Namespace) -> dict:
    # Width-16 channels (16..128) are not divisible into GroupNorm's (and EvoNorm-S0's) default 32
    # groups. MABN and CBN past their warmup / burn-in, so the timed steps use their windows (the steady state).
    return {"gn": {"num_groups": 8}, "evonorm_s0": {"num_groups": 8}, "mbn": {"ideal_batch_size": args.mbn_m0},
            "mabn": {"warmup_steps": 0, "renorm_warmup_steps": 0}, "cbn": {"burnin_steps": 0}}.get(norm, {})


def build(norm: str, args: argparse.Namespace, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=10, norm_layer=norm_layer(norm, **norm_kwargs(norm, args)), width=args.width)
    set_progress(model, EPOCH, TOTAL_EPOCHS)
    return model.to(device)


def make_train_step(model: nn.Module, forward: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(images), labels).backward()
        optimizer.step()

    return step


def make_eval_step(model: nn.Module, forward: nn.Module, images: torch.Tensor):
    def step() -> None:
        model.eval()
        with torch.inference_mode():
            forward(images)

    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    """Seconds per step of ``steps`` calls; on a GPU, from an idle device until its queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def bench(norms: list[str], batch_size: int, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    models = {norm: build(norm, args, seed=0, device=device) for norm in norms}
    # Fresh compiled code per batch size: no dynamic-shape graphs from the previous batch size.
    torch._dynamo.reset()
    forwards = {norm: torch.compile(model) if args.compile else model for norm, model in models.items()}
    steps = max(1, args.samples_per_round // batch_size)
    results = {}
    for mode in ("train", "eval"):
        fns = {
            norm: make_train_step(model, forwards[norm], images, labels) if mode == "train" else make_eval_step(model, forwards[norm], images)
            for norm, model in models.items()
        }
        for norm, fn in fns.items():
            if args.compile:  # MBN compiles twice: the first step initializes M/Phi (lam = 0)
                seconds = 2 * time_steps(fn, 2, device)
                print(f"# compile {mode} batch={batch_size} {norm}: {seconds:.1f} s (first two steps)", flush=True)
            time_steps(fn, max(3, steps // 2), device)  # warm-up: allocator, lazy init, MBN momentum initialization
        times: dict[str, list[float]] = {norm: [] for norm in norms}
        for round_index in range(args.rounds):
            order = norms[round_index % len(norms):] + norms[: round_index % len(norms)]
            for norm in order:
                times[norm].append(time_steps(fns[norm], steps, device))
        for norm in norms:
            ratios = [t / b for t, b in zip(times[norm], times["bn"])]
            results.setdefault(norm, {})[f"{mode}_ms"] = 1e3 * statistics.median(times[norm])
            results[norm][f"{mode}_ratio"] = statistics.median(ratios)
    return results


def profile(norms: list[str], batch_size: int, args: argparse.Namespace, device: torch.device, top: int = 15) -> None:
    """Print torch.profiler's ops by self CPU time over ``args.profile`` training steps of each norm."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    for norm in norms:
        model = build(norm, args, seed=0, device=device)
        step = make_train_step(model, model, images, labels)
        time_steps(step, 5, device)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds = time_steps(step, args.profile, device)
        print(f"# {norm}, batch {batch_size}: {1e3 * seconds:.2f} ms per training step under the profiler, "
              f"{args.profile} steps; top {top} ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--norms", nargs="+", default=[n for n in NORM_NAMES if n != "none"], choices=[n for n in NORM_NAMES if n != "none"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per batch size and mode")
    parser.add_argument("--samples-per-round", type=int, default=128, help="images per timed block (steps = this // batch)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--mbn-m0", type=int, default=32, help="MBN ideal batch size (lam = 0 at every epoch when batch >= m0)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model) (inductor) instead of eager")
    parser.add_argument("--device", default="cpu", help="torch device of the models and batches, e.g. cuda")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table and the peak GPU memory as JSON")
    parser.add_argument("--profile", type=int, metavar="STEPS", default=0,
                        help="instead of timing: torch.profiler's top ops (self CPU time) of STEPS training steps per norm "
                             "at the first batch size")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    norms = ["bn"] + [n for n in args.norms if n != "bn"]
    recompiling = [n for n in norms if NORM_SCHEMAS[n].RECOMPILES_EACH_STEP] if args.compile else []
    norms = [n for n in norms if n not in recompiling]
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(norms, args.batch_sizes[0], args, device)
        return
    # Every model of a batch size shares ResNet.forward's compiled-code cache (one entry per norm and mode).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(norms))

    print(f"# bench_norms  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# command: python scripts/bench_norms.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    where = f"{platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (float32), {where}"
        torch.cuda.reset_peak_memory_stats(device)
    print(
        f"# torch {torch.__version__}, python {platform.python_version()}, {where}, "
        f"ResNet-18 width={args.width}, 32x32 inputs, rounds={args.rounds}"
        + (", torch.compile (inductor)" if args.compile else ", eager")
    )
    m0 = args.mbn_m0
    lams = ", ".join(f"m={m}: lam={schedule.lam(EPOCH, TOTAL_EPOCHS, m, m0):.3f}" for m in args.batch_sizes)
    print(f"# mbn: m0={m0}, epoch {EPOCH}/{TOTAL_EPOCHS} ({lams}); gn, evonorm_s0: num_groups=8; brn, evonorm_b0, frn: defaults; "
          "mabn: window 16, no warmup; cbn: window 4, no burn-in")
    if recompiling:
        print(f"# not compiled: {', '.join(recompiling)} (they would recompile every step; trainer.compile refuses them too)")
    print(f"{'batch':>5} {'norm':>10} {'train ms':>9} {'train/BN':>9} {'eval ms':>8} {'eval/BN':>8}")
    rows = []
    for batch_size in args.batch_sizes:
        for norm, row in bench(norms, batch_size, args, device).items():
            rows.append({"batch_size": batch_size, "norm": norm, **row})
            print(
                f"{batch_size:>5} {norm:>10} {row['train_ms']:>9.2f} {row['train_ratio']:>9.3f} "
                f"{row['eval_ms']:>8.2f} {row['eval_ratio']:>8.3f}",
                flush=True,
            )
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if peak_mib is not None:
        print(f"# peak GPU memory allocated: {peak_mib:.1f} MiB")
    if args.json is not None:
        record = {"device": str(device), "compile": args.compile, "rows": rows, "peak_gpu_memory_allocated_mib": peak_mib}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
