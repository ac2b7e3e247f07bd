"""The stack probe: times both convolution paths and a few training steps, picks per layer, and caches per
machine and shape (no assertion on measured times: only on what was measured and what was reused)."""

from __future__ import annotations

import json

import pytest
import torch

from mbn.models import build_model, stack, stacked_modules
from mbn.models import stack_probe
from mbn.models.stack_probe import CACHE_FILE, StackProbe, choose_stack_size, probe_stack
from mbn.models.stacked_layers import CONV_PATHS, StackedConv2d
from mbn.nn import norm_layer

# Short timed blocks: what is tested is what gets measured and cached, not the timings.
TINY = {"width": 2, "norm": "bn", "batch_size": 2, "image_shape": (3, 8, 8), "num_classes": 3, "repeats": 1, "block_s": 0.01}


def _no_timing():
    raise AssertionError("the probe timed something instead of reading its cache")


def test_the_probe_picks_a_path_per_convolution_and_the_second_call_reads_the_cache(tmp_path, monkeypatch):
    probe = probe_stack("vgg11", num_members=2, cache_dir=tmp_path, **TINY)
    convs = [name for name, layer in stacked_modules(stack([build_model("vgg11", 3, norm_layer("bn"), width=2)] * 2))
             if isinstance(layer, StackedConv2d)]
    assert list(probe.conv_paths) == convs and set(probe.conv_paths.values()) <= set(CONV_PATHS)
    assert sorted(name for entry in probe.conv_times for name in entry["layers"]) == sorted(convs)
    assert probe.stacked_step_s > 0 and probe.single_step_s > 0 and not probe.cached
    assert probe.speedup > 0  # the median of the rounds' ratios: test_the_step_speedup_is_the_median_round_ratio
    entries = json.loads((tmp_path / CACHE_FILE).read_text())["entries"]
    assert len(entries) == 1

    monkeypatch.setattr(stack_probe._Clock, "once", lambda self, work: _no_timing())
    again = probe_stack("vgg11", num_members=2, cache_dir=tmp_path, **TINY)
    assert again.cached and again == StackProbe(**{**entries[next(iter(entries))], "cached": True})
    assert again.conv_paths == probe.conv_paths and again.speedup == probe.speedup
    # Another K (or shape) is another entry: it is measured.
    with pytest.raises(AssertionError, match="timed something"):
        probe_stack("vgg11", num_members=3, cache_dir=tmp_path, **TINY)


def test_one_member_is_not_timed_and_another_machine_is_another_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_probe._Clock, "once", lambda self, work: _no_timing())
    assert probe_stack("vgg11", num_members=1, cache_dir=tmp_path, **TINY) == StackProbe(1, 1.0)
    assert not (tmp_path / CACHE_FILE).exists()
    monkeypatch.undo()
    probe_stack("vgg11", num_members=2, cache_dir=tmp_path, **TINY)
    monkeypatch.setattr(stack_probe, "machine_key", lambda device="cpu": {"cpu": "another"})
    monkeypatch.setattr(stack_probe._Clock, "once", lambda self, work: _no_timing())
    with pytest.raises(AssertionError, match="timed something"):
        probe_stack("vgg11", num_members=2, cache_dir=tmp_path, **TINY)


class ScriptedClock(stack_probe._Clock):
    """Runs each timed block and says it took the next of ``durations`` seconds."""

    def __init__(self, durations=()):
        super().__init__(_no_timing, torch.device("cpu"))
        self.durations = iter(durations)

    def once(self, work):
        work()
        return next(self.durations)


def test_the_step_speedup_is_the_median_round_ratio_with_the_order_alternating():
    tiny = {"batch_size": 2, "num_members": 2, "image_shape": (3, 8, 8), "num_classes": 3, "device": "cpu"}
    models = [build_model("vgg11", 3, norm_layer("bn"), width=2) for _ in range(3)]
    stacked, single = stack(models[:2]), models[2]
    # Block sizing: the stacked step 0.2 s (one step per block), the single one 0.1 s (two steps per
    # block, MIN_BLOCK_S = 0.2). Rounds: stacked first, single first, stacked first.
    assert stack_probe.MIN_BLOCK_S == 0.2
    durations = [0.2, 0.1,
                 0.2, 0.2,    # stacked 0.2, single 0.1 per step: 2 x 0.1 / 0.2 = 1.0
                 0.24, 0.2,   # single first: single 0.12 per step, stacked 0.2: 1.2
                 0.02, 0.2]   # an outlier: 10.0
    speedup, stacked_s, single_s = stack_probe._time_steps(stacked, single, clock=ScriptedClock(durations), rounds=3, **tiny)
    # Had the second round not swapped the order, its ratio would be 0.83 and the median 1.0.
    assert speedup == pytest.approx(1.2, rel=1e-12)
    assert stacked_s == pytest.approx(0.2, rel=1e-12) and single_s == pytest.approx(0.1, rel=1e-12)


def test_a_convolution_goes_dense_only_when_clearly_faster(monkeypatch):
    stacked = stack([build_model("vgg11", 3, norm_layer("bn"), width=2) for _ in range(2)])
    convs = {name: layer for name, layer in stacked_modules(stacked) if isinstance(layer, StackedConv2d)}
    ran = []  # the path of every convolution call
    for layer in convs.values():
        layer.register_forward_hook(lambda module, args, out: ran.append(module.path))

    def choose(dense_over_grouped):
        class PathClock(ScriptedClock):
            """Says a call took 1 ms on the grouped path and ``dense_over_grouped`` ms on the dense one."""

            def once(self, work):
                ran.clear()
                work()
                return sum(1e-3 * (dense_over_grouped if path == "dense" else 1.0) for path in ran)

        return stack_probe._choose_conv_paths(stacked, (2, 6, 8, 8), "cpu", PathClock(), repeats=2)

    paths, times = choose(0.97)  # 3% faster: inside the margin, grouped stays
    assert set(paths) == set(convs) and set(paths.values()) == {"grouped"}
    assert all(entry["dense_s"] == pytest.approx(0.97 * entry["grouped_s"], rel=1e-9) for entry in times)
    paths, _ = choose(0.9)
    assert set(paths.values()) == {"dense"}


def test_the_chosen_k_is_the_least_projected_time_and_one_when_stacking_does_not_pay():
    asked = []

    def probe(speedups):
        def at(members):
            asked.append(members)
            return StackProbe(members, speedups.get(members, 1.0))
        return at

    # 8 jobs: K=2 costs 4 packs x 2 / 1.5, K=4 costs 2 x 4 / 3.2 (the least), K=8 costs 8 / 3.0.
    size, speeds, probes = choose_stack_size(8, probe({2: 1.5, 4: 3.2, 8: 3.0}))
    assert size == 4 and sorted(probes) == [1, 2, 4, 8] and sorted(asked) == [1, 2, 4, 8]
    assert speeds == pytest.approx({1: 1.0, 2: 1.5, 4: 3.2, 8: 3.0}, rel=1e-12)
    # 3 jobs: K=2 is a pack of 2 and one alone; stacking loses, so every job trains alone.
    size, speeds, _ = choose_stack_size(3, probe({2: 0.9, 3: 0.95}))
    assert size == 1 and speeds == pytest.approx({1: 1.0, 2: 3 / (2 / 0.9 + 1), 3: 0.95}, rel=1e-12)
    # A tie goes to the smaller K.
    assert choose_stack_size(4, probe({2: 2.0, 4: 2.0}))[0] == 2
