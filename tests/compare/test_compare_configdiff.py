"""Config comparison: common values, per-norm settings, per-run differences and confounds."""

from __future__ import annotations

import json

from fake_sweep import write_fake_run
from mbn.compare.aggregate import GridSpec
from mbn.compare.collect import collect_runs
from mbn.compare.configdiff import summarize_config
from mbn.results import RESULTS_FILENAME


def set_config(run_dir, dotted_key, value):
    path = run_dir / RESULTS_FILENAME
    data = json.loads(path.read_text())
    node = data["config"]
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(json.dumps(data))


def test_same_config_has_no_diffs_and_norm_settings_per_row(fake_sweep):
    summary = summarize_config(collect_runs([fake_sweep.root]), GridSpec())
    assert summary.varying == {}
    assert all(diff == {} for diff in summary.diffs.values())
    assert summary.row_settings["norm.name"] == {
        "bn": {},
        "gn": {"norm.num_groups": 8},
        "mbn": {"norm.ideal_batch_size": 32, "norm.tau0": 0.9, "norm.schedule": "epoch"},
    }
    assert summary.common["optim.base_lr"] == 0.1
    assert "output_root" not in summary.common and "logger.csv" not in summary.common  # bookkeeping
    assert "seed" not in summary.common and "data.batch_size" not in summary.common  # table keys


def test_a_deviating_run_and_a_deviating_norm_setting_are_reported(tmp_path):
    for seed in (0, 1, 2):
        write_fake_run(tmp_path / f"bn{seed}", "bn", 2, seed)
        write_fake_run(tmp_path / f"mbn{seed}", "mbn", 2, seed)
    set_config(tmp_path / "bn1", "optim.base_lr", 0.05)
    set_config(tmp_path / "mbn2", "norm.tau0", 0.5)
    runset = collect_runs([tmp_path])
    summary = summarize_config(runset, GridSpec())
    by_dir = {runset.runs.at[i, "run_dir"]: diff for i, diff in summary.diffs.items()}
    assert by_dir[str(tmp_path / "bn1")] == {"optim.base_lr": 0.05}
    assert by_dir[str(tmp_path / "mbn2")] == {"norm.tau0": 0.5}
    assert sum(bool(d) for d in by_dir.values()) == 2
    assert summary.varying == {"optim.base_lr": 2, "norm.tau0": 2}
    assert summary.row_settings["norm.name"]["mbn"]["norm.tau0"] == 0.9


def test_diffs_are_ordered_by_table_keys(tmp_path):
    for m in (32, 8, 2):
        write_fake_run(tmp_path / f"m{m}", "bn", m, 0)
    runset = collect_runs([tmp_path])
    order = [runset.runs.at[i, "data.batch_size"] for i in summarize_config(runset, GridSpec()).diffs]
    assert order == [2, 8, 32]
