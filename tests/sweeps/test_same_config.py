"""A run is its configuration, not its dir name: never trained twice, never counted twice.

``norm=bn`` is the default, so ``seed=0`` and ``norm=bn,seed=0`` name one configuration (one config
hash) in two dirs. Real ``mbn-train`` sweeps and ``mbn-compare`` on their real files.
"""

from __future__ import annotations

import json
import statistics

import pandas as pd
from scipy import stats as scipy_stats
from sweep_helpers import sweep_runs

from cli_runner import mbn_train as main

from mbn.cli import compare
from mbn.results import read_results


def bn_dir(sweep_dir, seed: int):
    """The dir of the default-norm (bn) job of ``seed``: its name has no ``norm=``."""
    (found,) = [p for p in sweep_dir.iterdir() if f"seed={seed}" in p.name.split(",") and "norm=" not in p.name]
    return found


def test_a_sweep_under_other_dir_names_skips_the_configs_already_run_and_says_where(tiny, run_env, capsys):
    base = ["-m", *tiny(), "sweep_name=same"]
    assert main([*base, "seed=0,1"]) == 0
    sweep_dir = run_env / "sweeps" / "same"
    first = sweep_runs(sweep_dir)
    capsys.readouterr()

    assert main([*base, "norm=bn,mbn", "seed=0,1", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    for seed in (0, 1):
        there = bn_dir(sweep_dir, seed)
        own = sweep_dir / there.name.replace(f"seed={seed}", f"norm=bn,seed={seed}")
        assert f"mbn-train: would skip {there} (completed; the same config as {own})" in out
    assert "mbn-train: dry run of 4 jobs: 2 skip, 2 start; nothing was run" in out

    assert main([*base, "norm=bn,mbn", "seed=0,1"]) == 0
    out = capsys.readouterr().out
    assert "mbn-train: sweep done: 2 completed, 0 failed, 2 skipped (of 4 jobs)" in out
    runs = sweep_runs(sweep_dir)
    assert sorted(r["norm"] for r in runs.values()) == ["bn", "bn", "mbn", "mbn"]  # no second bn run, no empty dir
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(runs)
    for name, record in first.items():
        assert read_results(sweep_dir / name)["attempts"] == record["attempts"]  # trained once


def test_a_killed_run_is_resumed_where_it_is_not_started_again_under_another_name(tiny, run_env, capsys):
    argv = tiny(epochs=2)
    assert main([*argv, "debug.fail_at_epoch=2"]) == 1
    (run_dir,) = [p for p in (run_env / "runs").iterdir()]
    capsys.readouterr()
    assert main([*argv, "norm=bn"]) == 0  # the same config, a dir name of its own
    out = capsys.readouterr().out
    assert f"mbn-train: completed {run_dir}:" in out
    record = read_results(run_dir)
    assert [a["status"] for a in record["attempts"]] == ["failed", "completed"]
    assert [row["epoch"] for row in record["history"]] == [1, 2]
    assert [p for p in (run_env / "runs").iterdir()] == [run_dir]


def test_mbn_compare_counts_each_configuration_once_and_keeps_the_test_paired(tiny, run_env, capsys, tmp_path):
    """The mean and the t interval of the two distinct seeds' recorded values, recomputed with scipy,
    against table.csv, which writes 6 significant digits: relative error up to 5e-6 per number (1e-5
    allowed on the half-width, a difference of two such numbers scaled by their magnitude)."""
    base = ["-m", *tiny(), "seed=0,1"]
    assert main([*base, "sweep_name=a"]) == 0
    assert main([*base, "norm=bn,mbn", "sweep_name=a"]) == 0
    # The same bn configs trained again in another sweep: combining the two sweeps sees each twice.
    assert main([*base, "sweep_name=b"]) == 0
    sweeps = run_env / "sweeps"
    older = {seed: bn_dir(sweeps / "a", seed) for seed in (0, 1)}
    newer = {seed: bn_dir(sweeps / "b", seed) for seed in (0, 1)}
    for seed in (0, 1):
        # The older duplicate says otherwise: if it were used (or averaged in) the numbers would show it.
        path = older[seed] / "results.json"
        record = json.loads(path.read_text())
        record["metrics"]["final_test_acc1"] = 0.0
        path.write_text(json.dumps(record))
    capsys.readouterr()

    out_dir = tmp_path / "compare"
    code = compare.main([str(sweeps / "a"), str(sweeps / "b"), "--baseline", "bn", "--interval", "ci95",
                         "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    table = pd.read_csv(out_dir / "table.csv").set_index("norm.name")
    bn_values = [read_results(newer[seed])["metrics"]["final_test_acc1"] * 100 for seed in (0, 1)]
    assert table.loc["bn", "n"] == 2 and table.loc["mbn", "n"] == 2
    mean = statistics.fmean(bn_values)
    assert abs(table.loc["bn", "mean_pct"] - mean) <= 5e-6 * abs(mean)
    half = scipy_stats.t.ppf(0.975, 1) * statistics.stdev(bn_values) / 2 ** 0.5
    low, high = table.loc["bn", "low_pct"], table.loc["bn", "high_pct"]
    assert abs((high - low) / 2 - half) <= 1e-5 * (abs(high) + abs(low))
    assert table.loc["mbn", "test"] == "paired t" and pd.isna(table.loc["mbn", "unpaired_reason"])
    for seed in (0, 1):
        assert "duplicate" in err and f"[{older[seed]}]" in err
        assert f"as the completed run used: {newer[seed]}" in err
    assert "has 2 runs" not in err
