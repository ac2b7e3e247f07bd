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

Times are minima over a few repetitions (the least disturbed run on a busy machine). The result is
cached per machine (CPU model, thread count, torch version, device) and shape in
``stack_probe.json`` under :mod:`mbn.data`'s cache dir, so asking again costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import platform
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

__all__ = ["CACHE_FILE", "StackProbe", "machine_key", "probe_stack"]

CACHE_FILE = "stack_probe.json"
# Bump when what is measured changes (invalidates cached probes).
PROBE_FORMAT = 2


@dataclass(frozen=True)
class StackProbe:
    """What :func:`probe_stack` measured for one shape and K.

    Args:
        num_members: K.
        speedup: K single training steps' time over one stacked step's (> 1: stacking is faster;
            exactly 1 for K = 1, which is not timed).
        stacked_step_s: one stacked training step, seconds (0 for K = 1).
        single_step_s: one single model's training step, seconds (0 for K = 1).
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
        repeats: timed repetitions of each measurement, after one warm-up.
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

        clock = _Clock(timer, torch.device(device))
        stacked = stack([build(seed) for seed in range(num_members)])
        single = build(0)
        conv_paths, conv_times = _choose_conv_paths(stacked, (batch_size, num_members * image_shape[0], *image_shape[1:]),
                                                    device, clock, repeats)
        set_conv_paths(stacked, conv_paths)
        stacked_s, single_s = _time_steps(stacked, single, batch_size, num_members, image_shape, num_classes, device, clock, repeats)
        result = StackProbe(num_members, num_members * single_s / stacked_s, stacked_s, single_s, conv_paths, conv_times)
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
    """The timer, with the device's queue drained before each reading."""

    def __init__(self, timer: Callable[[], float], device: torch.device) -> None:
        self.timer, self.cuda = timer, device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.timer()

    def once(self, work: Callable[[], None]) -> float:
        start = self()
        work()
        return self() - start

    def best_of(self, repeats: int, work: Callable[[], None]) -> float:
        work()  # warm-up: allocations, kernel selection
        return min(self.once(work) for _ in range(repeats))


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
        timed = {}
        for path in CONV_PATHS:
            layer.path = path

            def work() -> None:
                layer(x).backward(grad)

            timed[path] = clock.best_of(repeats, work)
        layer.path = "grouped"
        layer.zero_grad(set_to_none=True)
        best = min(CONV_PATHS, key=lambda path: timed[path])  # grouped on a tie: today's behaviour
        paths.update(dict.fromkeys(names, best))
        times.append({"layers": names, "shape": shape, **{f"{path}_s": timed[path] for path in CONV_PATHS}})
    return paths, times


def _time_steps(stacked: nn.Module, single: nn.Module, batch_size: int, num_members: int, image_shape: tuple[int, int, int],
                num_classes: int, device: Any, clock: _Clock, repeats: int) -> tuple[float, float]:
    """One stacked and one single training step's best time, measured alternately (so drift hits both alike)."""
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

    stacked_step = step(stacked, lambda: member_cross_entropy(stacked(images), labels).sum())
    single_step = step(single, lambda: F.cross_entropy(single(images[:, : image_shape[0]]), labels[:, 0]))
    stacked_step()  # warm-up
    single_step()
    stacked_s, single_s = [], []
    for _ in range(repeats):
        stacked_s.append(clock.once(stacked_step))
        single_s.append(clock.once(single_step))
    return min(stacked_s), min(single_s)
