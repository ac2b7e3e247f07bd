"""The stack probe: times both convolution paths and a few training steps, picks per layer, and caches per
machine and shape (no assertion on measured times: only on what was measured and what was reused)."""

from __future__ import annotations

import json

import pytest

from mbn.models import build_model, stack, stacked_modules
from mbn.models import stack_probe
from mbn.models.stack_probe import CACHE_FILE, StackProbe, probe_stack
from mbn.models.stacked_layers import CONV_PATHS, StackedConv2d
from mbn.nn import norm_layer

TINY = {"width": 2, "norm": "bn", "batch_size": 2, "image_shape": (3, 8, 8), "num_classes": 3, "repeats": 1}


def _no_timing():
    raise AssertionError("the probe timed something instead of reading its cache")


def test_the_probe_picks_a_path_per_convolution_and_the_second_call_reads_the_cache(tmp_path, monkeypatch):
    probe = probe_stack("vgg11", num_members=2, cache_dir=tmp_path, **TINY)
    convs = [name for name, layer in stacked_modules(stack([build_model("vgg11", 3, norm_layer("bn"), width=2)] * 2))
             if isinstance(layer, StackedConv2d)]
    assert list(probe.conv_paths) == convs and set(probe.conv_paths.values()) <= set(CONV_PATHS)
    assert sorted(name for entry in probe.conv_times for name in entry["layers"]) == sorted(convs)
    assert probe.stacked_step_s > 0 and probe.single_step_s > 0 and not probe.cached
    assert probe.speedup == pytest.approx(2 * probe.single_step_s / probe.stacked_step_s)
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
