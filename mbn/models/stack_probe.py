"""A short timed probe: does stacking K runs pay on this machine, and with which path per convolution?

Whether a stacked model of K members (:func:`~mbn.models.stack`) trains faster than K single
models depends on the machine, the backbone, its width, the batch size and K: stacking pays the
per-operation overhead once for K runs, but a grouped convolution's kernel can be slower than K
dense ones at many channels per group (BENCHMARKS.md, "Stacked runs"). :func:`probe_stack` measures
it where it matters:

1. each distinct stacked convolution (its configuration and input shape) is timed, forward and
   backward, on both paths of :class:`~mbn.models.stacked_layers.StackedConv2d` (one grouped
   convolution, or one dense convolution per member); each layer gets the faster one;
2. a few full training steps (forward, backward, SGD) of the stacked model with those paths are
   timed against one single model's steps: the speedup is ``K * single / stacked``.

A convolution's times are minima over a few blocks of calls, the two paths alternately (the least
disturbed block on a busy machine), and the dense path is taken only when clearly faster;
the training steps are timed in rounds of blocks, stacked and single alternately (which goes first
alternates too), and the speedup is the median of the rounds' ratios, so that drift of a shared
machine hits both sides alike. :func:`choose_stack_size` turns probes into the K that trains a group
of jobs fastest (``stack=auto``). The result is cached per machine (CPU model, thread count, torch version, device) and shape in
``stack_probe.json`` under :mod:`mbn.data`'s cache dir, so asking again costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.data.cache import default_cache_dir
from mbn.models.factory import build_model
from mbn.models.stack import set_conv_paths, stack, stacked_modules
from mbn.models.stacked_layers import CONV_PATHS, StackedConv2d
from mbn.models.stacked_loss import member_cross_entropy
from mbn.nn import norm_layer, set_progress
from mbn.utils.io import atomic_write_json

__all__ = ["AUTO_STACK_SIZES", "CACHE_FILE", "StackProbe", "choose_stack_size", "machine_key", "probe_stack"]

CACHE_FILE = "stack_probe.json"
# Bump when what is measured changes (invalidates cached probes).
PROBE_FORMAT = 3
# The K that stack=auto considers (each capped at the number of jobs).
AUTO_STACK_SIZES = (1, 2, 4, 8)
# A convolution takes the dense path only when it is faster by more than this fraction.
DENSE_MARGIN = 0.05
# A timed block of training steps lasts at least this long (one step if a step is longer), so that a
# block of fast steps is not all timer resolution and scheduler noise.
MIN_BLOCK_S = 0.2


@dataclass(frozen=True)
class StackProbe:
    """What :func:`probe_stack` measured for one shape and K.

    Args:
        num_members: K.
        speedup: K single training steps' time over one stacked step's, the median over the timing
            rounds (> 1: stacking is faster; exactly 1 for K = 1, which is not timed).
        stacked_step_s: one stacked training step, seconds, the median over the rounds (0 for K = 1).
        single_step_s: one single model's training step, seconds, the median over the rounds (0 for K = 1).
        conv_paths: the chosen path of each stacked convolution, by layer name.
        conv_times: per distinct convolution: ``{"layers": [...], "shape": ..., "grouped_s": ..., "dense_s": ...}``.
        cached: read from the cache rather than measured now.
    """

    num_members: int
    speedup: float
    stacked_step_s: float = 0.0
    single_step_s: float = 0.0
    conv_paths: dict[str, str] = field(default_factory=dict)
    conv_times: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False

    def summary(self) -> str:
        """One line: K, speedup, step times and how many convolutions take each path."""
        if self.num_members == 1:
            return "K=1: unstacked (speedup 1 by definition)"
        counts = {path: sum(1 for chosen in self.conv_paths.values() if chosen == path) for path in CONV_PATHS}
        paths = ", ".join(f"{n} {path}" for path, n in counts.items() if n)
        return (f"K={self.num_members}: {self.speedup:.2f}x ({self.num_members} single steps "
                f"{self.num_members * self.single_step_s * 1e3:.1f} ms, stacked step {self.stacked_step_s * 1e3:.1f} ms; "
                f"convs {paths}{'; cached' if self.cached else ''})")


def machine_key(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a timing depends on besides the shape: CPU model, thread count, torch version, device.

    Args:
        device: the device the probe runs on.
    """
    device = torch.device(device)
    key = {"cpu": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        key["device"] = torch.cuda.get_device_name(device)
    return key


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_stack(
    backbone: str,
    *,
    width: int,
    norm: str,
    batch_size: int,
    num_members: int,
    norm_options: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    repeats: int = 3,
    block_s: float = MIN_BLOCK_S,
    cache_dir: str | Path | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> StackProbe:
    """Time K stacked members against K single models of one shape; cached (see the module doc).

    Args:
        backbone: a model name of :func:`~mbn.models.build_model`.
        width: the model's width.
        norm: a norm name of :func:`mbn.nn.norm_layer`.
        batch_size: images per step and member, m.
        num_members: K (1 returns speedup 1 without timing).
        norm_options: the norm layer's options (as :func:`mbn.nn.norm_layer` takes them).
        model_options: the model's options (as :func:`~mbn.models.build_model` takes them).
        image_shape: ``(channels, height, width)`` of one image.
        num_classes: logits per member.
        device: where to time (a CUDA device is synchronized around each timing).
        num_threads: ``torch.set_num_threads`` during the probe (None: the current count), as the job will train.
        repeats: timed repetitions of each convolution, after one warm-up; the training steps are
            timed in ``repeats + 4`` rounds.
        block_s: the least length of a timed block of training steps, seconds (a conv's: a tenth of it).
        cache_dir: where ``stack_probe.json`` lives (None: ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``).
        timer: the clock (seconds).

    Returns:
        The :class:`StackProbe`.
    """
    if num_members < 1 or repeats < 1:
        raise ValueError(f"num_members and repeats must be positive, got {num_members} and {repeats}")
    if num_members == 1:
        return StackProbe(1, 1.0)
    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        shape = {"backbone": backbone, "width": width, "norm": norm, "norm_options": dict(norm_options or {}),
                 "model_options": dict(model_options or {}), "batch_size": batch_size, "num_members": num_members,
                 "image_shape": list(image_shape), "num_classes": num_classes}
        key = json.dumps({"format": PROBE_FORMAT, "machine": machine_key(device), "shape": shape}, sort_keys=True, default=str)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / CACHE_FILE
        entries = _read_cache(path)
        if key in entries:
            return dataclasses.replace(StackProbe(**entries[key]), cached=True)

        def build(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            factory = norm_layer(norm, **dict(norm_options or {}))
            model = build_model(backbone, num_classes=num_classes, norm_layer=factory, width=width,
                                in_channels=image_shape[0], **dict(model_options or {})).to(device)
            set_progress(model, 5, 10)  # MBN mid-schedule (lam > 0 at m < m0), as most of a run trains
            return model

        clock = _Clock(timer, torch.device(device), block_s)
        stacked = stack([build(seed) for seed in range(num_members)])
        single = build(0)
        conv_paths, conv_times = _choose_conv_paths(stacked, (batch_size, num_members * image_shape[0], *image_shape[1:]),
                                                    device, clock, repeats)
        set_conv_paths(stacked, conv_paths)
        speedup, stacked_s, single_s = _time_steps(stacked, single, batch_size, num_members, image_shape, num_classes,
                                                   device, clock, repeats + 4)
        result = StackProbe(num_members, speedup, stacked_s, single_s, conv_paths, conv_times)
        entries = _read_cache(path)  # another process may have added entries meanwhile
        entries[key] = {name: value for name, value in dataclasses.asdict(result).items() if name != "cached"}
        atomic_write_json(path, {"format": PROBE_FORMAT, "entries": entries})
        return result
    finally:
        torch.set_num_threads(threads_before)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("format") == PROBE_FORMAT else {}


class _Clock:
    """The timer, with the device's queue drained before each reading, and the least length of a timed block."""

    def __init__(self, timer: Callable[[], float], device: torch.device, block_s: float = MIN_BLOCK_S) -> None:
        self.timer, self.cuda, self.block_s = timer, device.type == "cuda", block_s

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.timer()

    def once(self, work: Callable[[], None]) -> float:
        start = self()
        work()
        return self() - start

    def alternating(self, works: Mapping[str, Callable[[], None]], rounds: int, block_s: float) -> dict[str, list[float]]:
        """One call's time of each of ``works``, per round: each is warmed up, its block sized to last at
        least ``block_s`` seconds, then the blocks are timed back to back in ``rounds`` rounds, the order
        reversed every other round, so drift of a shared machine hits all alike."""
        calls = {}
        for name, work in works.items():
            work()  # warm-up: allocations, kernel selection (MBN: its first, lam = 0 step)
            calls[name] = max(1, math.ceil(block_s / max(self.once(work), 1e-9)))
        seconds: dict[str, list[float]] = {name: [] for name in works}
        order = list(works)
        for index in range(rounds):
            for name in order if index % 2 == 0 else order[::-1]:
                seconds[name].append(self.once(_repeated(works[name], calls[name])) / calls[name])
        return seconds


def _repeated(work: Callable[[], None], calls: int) -> Callable[[], None]:
    def block() -> None:
        for _ in range(calls):
            work()

    return block


def _choose_conv_paths(stacked: nn.Module, input_shape: tuple[int, ...], device: Any, clock: _Clock,
                       repeats: int) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Each stacked convolution's faster path, timing each distinct (configuration, input shape) once."""
    convs = [(name, layer) for name, layer in stacked_modules(stacked) if isinstance(layer, StackedConv2d)]
    inputs: dict[str, torch.Size] = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].shape))
             for name, layer in convs]
    try:
        with torch.no_grad():
            stacked(torch.randn(input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    distinct: dict[str, list[str]] = {}
    for name, layer in convs:
        distinct.setdefault(f"{nn.Conv2d.extra_repr(layer)}, input={tuple(inputs[name])}", []).append(name)
    layers = dict(convs)
    paths: dict[str, str] = {}
    times = []
    for shape, names in distinct.items():
        layer = layers[names[0]]
        x = torch.randn(inputs[names[0]], device=device, requires_grad=True)
        grad = torch.randn_like(layer(x).detach())

        def run(path: str) -> Callable[[], None]:
            def work() -> None:
                layer.path = path
                layer(x).backward(grad)

            return work

        seconds = clock.alternating({path: run(path) for path in CONV_PATHS}, repeats, clock.block_s / 10)
        timed = {path: min(seconds[path]) for path in CONV_PATHS}
        layer.path = "grouped"
        layer.zero_grad(set_to_none=True)
        # Dense only when clearly faster: a near-tie flips with the noise of a shared machine, and grouped
        # is the path without a Python loop over the members.
        best = "dense" if timed["dense"] < (1 - DENSE_MARGIN) * timed["grouped"] else "grouped"
        paths.update(dict.fromkeys(names, best))
        times.append({"layers": names, "shape": shape, **{f"{path}_s": timed[path] for path in CONV_PATHS}})
    return paths, times


def _time_steps(stacked: nn.Module, single: nn.Module, batch_size: int, num_members: int, image_shape: tuple[int, int, int],
                num_classes: int, device: Any, clock: _Clock, rounds: int) -> tuple[float, float, float]:
    """The speedup and one stacked and one single training step's time, each the median over ``rounds``
    rounds that time a block of stacked steps and a block of single steps back to back (alternating
    which goes first), so drift hits both alike."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, num_members * image_shape[0], *image_shape[1:], generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size, num_members), generator=generator).to(device)

    def step(model: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], None]:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()

        return run

    # Blocks of about equal length in seconds: the single model's block takes about K times the steps.
    seconds = clock.alternating({"stacked": step(stacked, lambda: member_cross_entropy(stacked(images), labels).sum()),
                                 "single": step(single, lambda: F.cross_entropy(single(images[:, : image_shape[0]]), labels[:, 0]))},
                                rounds, clock.block_s)
    ratios = [num_members * single_s / stacked_s for stacked_s, single_s in zip(seconds["stacked"], seconds["single"])]
    return statistics.median(ratios), statistics.median(seconds["stacked"]), statistics.median(seconds["single"])


def choose_stack_size(count: int, probe: Callable[[int], StackProbe],
                      sizes: tuple[int, ...] = AUTO_STACK_SIZES) -> tuple[int, dict[int, float], dict[int, StackProbe]]:
    """The K that trains ``count`` jobs of one shape fastest in one process, from their probes.

    Candidates are ``sizes`` capped at ``count``; K's time is the sum over its packs (``count`` split
    into packs of K, the last one smaller) of r members / speedup(r) single steps. The fastest wins,
    the smaller on a tie (1, every job alone, when stacking does not pay).

    Args:
        count: the jobs (the swept values of the pack key).
        probe: K -> the shape's :class:`StackProbe` for K members (e.g. :func:`probe_stack`, cached).
        sizes: the K considered.

    Returns:
        The K, each candidate's projected speed against unstacked, and the probes by K.
    """
    candidates = sorted({min(size, count) for size in sizes})
    probes: dict[int, StackProbe] = {}
    costs = {}
    for size in candidates:
        packs = [size] * (count // size) + ([count % size] if count % size else [])
        for members in packs:
            if members not in probes:
                probes[members] = probe(members)
        costs[size] = sum(members / probes[members].speedup for members in packs)
    best = min(candidates, key=lambda size: (costs[size], size))
    return best, {size: count / cost for size, cost in costs.items()}, probes
