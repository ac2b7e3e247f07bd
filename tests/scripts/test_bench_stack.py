"""scripts/bench_stack.py --stack-auto: each cell trains as stack=auto would (the K the planner picks from the
probes, their conv paths), and a cell where stacking does not pay is the unstacked sweep itself. The probes
are replaced by fixed speedups, so what is tested is the choice and what gets timed; no timing is asserted."""

from __future__ import annotations

import json

import pytest

from mbn.models.stack_probe import StackProbe

TINY = ["--widths", "2", "--batch-sizes", "2", "--norms", "bn", "--steps", "2", "--rounds", "2", "--warmup", "1",
        "--image-size", "8"]


@pytest.fixture(scope="module")
def bench_stack(load_script):
    return load_script("bench_stack")


def test_stack_auto_times_the_chosen_k_and_leaves_an_unstacked_cell_untimed(bench_stack, monkeypatch, tmp_path, capsys):
    asked = []

    def fake_probe(backbone, *, num_members, **shape):
        asked.append(num_members)
        return StackProbe(num_members, {1: 1.0, 2: 0.8, 4: 1.6}[num_members], conv_paths={"features.0": "dense"})

    monkeypatch.setattr(bench_stack, "probe_stack", fake_probe)
    stacked_sizes = []
    real_stack = bench_stack.stack
    monkeypatch.setattr(bench_stack, "stack", lambda models: (stacked_sizes.append(len(models)), real_stack(models))[1])
    monkeypatch.setattr(bench_stack, "set_conv_paths", lambda model, paths: None)
    bench_stack.main([*TINY, "--stacks", "2", "4", "--stack-auto", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    # K = 2: 2 / 0.8 > 2 single steps, so every job alone: ratio 1, nothing stacked or timed.
    assert rows[0]["auto_stack"] == 1 and rows[0]["ratio"] == 1.0 and rows[0]["stacked_img_per_s"] is None
    assert rows[0]["projected_speed"] == {"1": 1.0, "2": 0.8}
    # K = 4: 4 / 1.6 is the least (K = 2's packs: 2 x 2 / 0.8), so one stack of 4 is timed against 4 runs.
    assert rows[1]["auto_stack"] == 4 and rows[1]["probe_speedup"] == 1.6 and rows[1]["dense_convs"] == 1
    assert rows[1]["stacked_img_per_s"] > 0 and rows[1]["ratio"] > 0
    assert stacked_sizes == [4] and sorted(set(asked)) == [1, 2, 4]
    out = capsys.readouterr().out
    assert "K' = 1 trains the K jobs unstacked" in out and "1:1.00 2:0.80" in out
