"""Reading results.json files into a RunSet: every file becomes a row, unreadable ones too."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fake_sweep import EPOCHS, write_fake_run
from mbn.compare.aggregate import GridSpec, build_grid
from mbn.compare.collect import UNREADABLE, collect_runs, load_runs, plain, schema1_note
from mbn.compare.problems import run_problems
from mbn.results import RESULTS_FILENAME


def test_every_results_json_becomes_one_row(fake_sweep):
    runset = collect_runs([fake_sweep.root])
    assert len(runset) == fake_sweep.n_files == 26
    assert sorted(runset.runs["source"]) == sorted(str(d / RESULTS_FILENAME) for d in fake_sweep.run_dirs.values())
    by_dir = runset.runs.set_index("run_dir")
    for key, run_dir in fake_sweep.run_dirs.items():
        row = by_dir.loc[str(run_dir)]
        assert row["status"] == fake_sweep.statuses[key]
        assert (row["norm.name"], plain(row["data.batch_size"]), plain(row["seed"])) == key
        expected = fake_sweep.results[key]["metrics"]["final_test_acc1"]
        assert (plain(row["final_test_acc1"]) is None) if expected is None else row["final_test_acc1"] == expected


def test_config_metrics_and_errors_are_columns(fake_sweep):
    runset = collect_runs([fake_sweep.root])
    assert {"norm.name", "data.batch_size", "seed", "epochs", "model.name", "optim.base_lr"} <= set(runset.config_keys)
    assert {"best_val_acc1", "final_val_acc1", "best_epoch"} <= set(runset.metric_keys)
    failed = runset.runs[runset.runs["status"] == "failed"].iloc[0]
    assert failed["error"] == "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed."
    # list values are kept as comparable text
    assert runset.runs["optim.milestones"].iloc[0] == "[0.3, 0.6, 0.9]"


def test_a_resumed_runs_total_wall_time_counts_every_attempt(fake_sweep):
    key = next(k for k, status in fake_sweep.statuses.items() if status == "completed")
    path = fake_sweep.run_dirs[key] / RESULTS_FILENAME
    record = json.loads(path.read_text())
    record["attempts"] = [{"status": "interrupted", "wall_time_s": 100.25}, {"status": "completed", "wall_time_s": 50.5}]
    record["wall_time_s"] = 50.5
    path.write_text(json.dumps(record))
    runs = collect_runs([fake_sweep.root]).runs.set_index("run_dir")
    assert (runs.loc[str(path.parent), "wall_time_s"], runs.loc[str(path.parent), "total_wall_time_s"]) == (50.5, 150.75)
    # A record without attempts: its own seconds.
    other = runs.drop(index=str(path.parent))
    other = other[other["status"] == "completed"].iloc[0]
    assert other["total_wall_time_s"] == other["wall_time_s"] > 0


def test_history_is_long_table_with_lam_tau(fake_sweep):
    runset = collect_runs([fake_sweep.root])
    history = runset.history
    mbn_ids = runset.runs.index[(runset.runs["norm.name"] == "mbn") & (runset.runs["status"] == "completed")]
    mbn_rows = history[history["run_id"].isin(mbn_ids)]
    assert len(mbn_rows) == len(mbn_ids) * EPOCHS
    assert mbn_rows["tau"].notna().all() and mbn_rows["lam"].notna().all()
    bn_ids = runset.runs.index[runset.runs["norm.name"] == "bn"]
    assert history[history["run_id"].isin(bn_ids)]["lam"].isna().all()
    diverged_id = runset.runs.index[runset.runs["status"] == "diverged"][0]
    losses = history[history["run_id"] == diverged_id]["train_loss"].tolist()
    assert len(losses) == 2 and math.isnan(losses[-1])


def test_corrupt_and_foreign_files_are_unreadable_rows_not_crashes(fake_sweep):
    broken = fake_sweep.root / "norm=bn,data.batch_size=4,seed=0"
    broken.mkdir()
    (broken / RESULTS_FILENAME).write_text('{"status": "completed", "metrics": {')  # truncated write
    foreign = fake_sweep.root / "other"
    foreign.mkdir()
    (foreign / RESULTS_FILENAME).write_text('{"accuracy": 0.9}')
    runset = collect_runs([fake_sweep.root])
    assert len(runset) == fake_sweep.n_files + 2
    unreadable = runset.runs[runset.runs["status"] == UNREADABLE].set_index("run_dir")
    assert set(unreadable.index) == {str(broken), str(foreign)}
    assert unreadable.loc[str(broken), "error"].startswith("JSONDecodeError")
    assert "no 'status' key" in unreadable.loc[str(foreign), "error"]


def test_several_sweeps_combine_and_single_run_dirs_work(tmp_path):
    write_fake_run(tmp_path / "a" / "run1", "bn", 2, 0)
    write_fake_run(tmp_path / "b" / "run1", "mbn", 2, 0)
    runs = load_runs([tmp_path / "a", tmp_path / "b" / "run1" / RESULTS_FILENAME])
    assert sorted(runs["norm.name"]) == ["bn", "mbn"]


def test_missing_dir_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_runs([tmp_path / "nope"])


def test_resolve_key_aliases_and_suggests(fake_sweep):
    runset = collect_runs([fake_sweep.root])
    assert runset.resolve_key("norm") == "norm.name"
    assert runset.resolve_key("data.batch_size") == "data.batch_size"
    with pytest.raises(KeyError, match="data.batch_size"):
        runset.resolve_key("data.batchsize")


def test_unknown_schema_version_is_a_problem_run_not_a_table_cell(fake_sweep):
    path = fake_sweep.run_dirs[("gn", 8, 0)] / RESULTS_FILENAME
    path.write_text(path.read_text().replace('"schema_version": 2', '"schema_version": 3'))
    runset = collect_runs([fake_sweep.root])
    run = runset.runs.set_index("run_dir").loc[str(path.parent)]
    assert run["status"] == UNREADABLE
    assert run["error"] == "unknown schema_version 3 (this mbn-compare reads 1, 2)"
    grid = build_grid(runset, GridSpec())
    assert grid.cell(("gn",), 8).n == 2 and 0 not in grid.cell(("gn",), 8).over_values
    problems = run_problems(runset, GridSpec())
    assert [(p.reason, p.run_dir) for p in problems if "schema_version" in p.error] == [(UNREADABLE, str(path.parent))]


def test_runs_are_listed_where_they_were_found_not_where_they_were_written(fake_sweep, tmp_path):
    copy = tmp_path / "copied" / "fake"
    shutil.copytree(fake_sweep.root, copy)
    shutil.rmtree(fake_sweep.root)  # the paths recorded inside the files no longer exist
    runset = collect_runs([copy])
    assert all(run_dir.startswith(str(copy)) for run_dir in runset.runs["run_dir"])
    problems = run_problems(runset, GridSpec())
    assert len(problems) == 3
    for problem in problems:
        key = (problem.labels["norm.name"], problem.labels["data.batch_size"], problem.labels["seed"])
        assert problem.run_dir == str(copy / fake_sweep.run_dirs[key].name)


def test_a_record_from_before_a_metric_existed_gets_it_from_its_history(tmp_path):
    results = write_fake_run(tmp_path, "bn", 2, 0)
    del results["metrics"]["final_train_acc1"]
    older = tmp_path / "older"
    older.mkdir()
    (older / RESULTS_FILENAME).write_text(json.dumps(results))
    runset = collect_runs([older])
    assert runset.runs["final_train_acc1"].iloc[0] == results["history"][-1]["train_acc1"]
    # A metric the record states (even as null) is kept, not recomputed.
    results["metrics"]["final_train_acc1"] = None
    (older / RESULTS_FILENAME).write_text(json.dumps(results))
    assert plain(collect_runs([older]).runs["final_train_acc1"].iloc[0]) is None


def test_a_running_record_whose_process_is_gone_is_interrupted(tmp_path):
    from mbn.results import LOCK_FILENAME
    from mbn.train.run_dir import job_lock

    write_fake_run(tmp_path / "dead", "mbn", 32, 2, status="running")
    write_fake_run(tmp_path / "alive", "mbn", 32, 1, status="running")
    write_fake_run(tmp_path / "unknown", "mbn", 32, 0, status="running")  # no lock file: not mbn-train's job owner
    (tmp_path / "dead" / LOCK_FILENAME).touch()
    with job_lock(tmp_path / "alive"):
        runs = collect_runs([tmp_path]).runs.set_index("run_dir")
    assert runs.loc[str(tmp_path / "dead"), "status"] == "interrupted"
    assert runs.loc[str(tmp_path / "dead"), "error"].startswith("its process ended without a final status")
    assert runs.loc[str(tmp_path / "alive"), "status"] == "running"
    assert runs.loc[str(tmp_path / "unknown"), "status"] == "running"


# A published schema 1 record (the trained-regime study's BN, m = 2, seed 0): its val_* are test-split numbers.
V1_RECORD = Path(__file__).resolve().parents[2] / "experiments" / "batch_size_study" / "results" / "runs" / \
    "data.batch_size=2,norm=bn,seed=0" / RESULTS_FILENAME


def test_a_schema_1_and_a_schema_2_record_are_read_in_the_current_names(tmp_path):
    (tmp_path / "v1").mkdir()
    shutil.copy(V1_RECORD, tmp_path / "v1" / RESULTS_FILENAME)
    v1 = json.loads(V1_RECORD.read_text())
    v2 = write_fake_run(tmp_path / "v2", "bn", 8, 0)
    assert (v1["schema_version"], v2["schema_version"]) == (1, 2)
    runset = collect_runs([tmp_path])
    rows = runset.runs.set_index("run_dir")
    old, new = rows.loc[str(tmp_path / "v1")], rows.loc[str(tmp_path / "v2")]
    assert (old["schema_version"], new["schema_version"]) == (1, 2)
    # Schema 1's test-split numbers under the test names, and still under the old val names.
    for test_key, v1_key in (("final_test_acc1", "final_val_acc1"), ("final_test_acc5", "final_val_acc5"),
                             ("final_test_loss", "final_val_loss"), ("best_test_acc1", "best_val_acc1")):
        assert old[test_key] == old[v1_key] == v1["metrics"][v1_key], test_key
    assert old["best_epoch"] == v1["metrics"]["best_epoch"]
    for key in ("final_test_acc1", "final_val_acc1", "best_val_acc1", "best_epoch_test_acc1"):
        assert new[key] == v2["metrics"][key], key
    assert new["final_val_acc1"] != new["final_test_acc1"]  # two splits
    history = runset.history[runset.history["run_id"] == rows.index.get_loc(str(tmp_path / "v1"))]
    assert list(history["test_acc1"]) == [row["val_acc1"] for row in v1["history"]]
    grid = build_grid(runset, GridSpec(metric="final_test_acc1"))
    assert grid.cell(("bn",), 2).values == [v1["metrics"]["final_val_acc1"]]
    assert grid.cell(("bn",), 8).values == [v2["metrics"]["final_test_acc1"]]
    assert schema1_note(runset, ["final_test_acc1", "test_acc1"]) is None
    note = schema1_note(runset, ["final_val_acc1", "test_acc1"])
    assert note.startswith("1 run(s) are schema 1 records (no validation split): their final_val_acc1 are test-split numbers")
    assert schema1_note(collect_runs([tmp_path / "v2"]), ["final_val_acc1"]) is None
