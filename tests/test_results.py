import json

import pytest

from mbn.results import (
    RESULTS_FILENAME,
    config_hash,
    copy_results,
    flatten,
    iter_results,
    read_results,
    write_results,
)


def test_config_hash_ignores_key_order_and_excluded_keys():
    a = {"seed": 0, "data": {"batch_size": 2, "name": "c10"}, "output_root": "/x", "hydra": {"a": 1}}
    b = {"data": {"name": "c10", "batch_size": 2}, "seed": 0, "output_root": "/elsewhere"}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16


def test_config_hash_changes_with_what_the_run_computes():
    base = {"seed": 0, "data": {"batch_size": 2}}
    assert config_hash(base) != config_hash({"seed": 1, "data": {"batch_size": 2}})
    assert config_hash(base) != config_hash({"seed": 0, "data": {"batch_size": 4}})


def test_a_key_added_at_its_neutral_value_keeps_the_hash_of_the_runs_recorded_before_it():
    # data.val_subset arrived after the published studies: at null (no validation split) the run
    # computes what those runs computed, so a rerun of their commands must find them by hash.
    before = {"seed": 0, "data": {"batch_size": 2, "name": "c10"}}
    now = {"seed": 0, "data": {"batch_size": 2, "name": "c10", "val_subset": None}}
    assert config_hash(now) == config_hash(before)
    assert now["data"]["val_subset"] is None  # the caller's config is left as it was
    assert config_hash({**now, "data": {**now["data"], "val_subset": 500}}) != config_hash(before)


def test_write_then_read_results(tmp_path):
    write_results(tmp_path, {"status": "completed", "metrics": {"best_val_acc1": 0.9}})
    data = read_results(tmp_path)
    assert data["schema_version"] == 2
    assert data["metrics"]["best_val_acc1"] == 0.9
    assert data["output_dir"] == str(tmp_path)


def test_write_results_rejects_unknown_status(tmp_path):
    with pytest.raises(ValueError, match="status must be one of"):
        write_results(tmp_path, {"status": "done"})
    assert not (tmp_path / RESULTS_FILENAME).exists()


def test_read_results_rejects_foreign_json(tmp_path):
    (tmp_path / RESULTS_FILENAME).write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not an mbn results.json"):
        read_results(tmp_path)


def test_iter_results_finds_nested_runs_and_skips_hidden_dirs(tmp_path):
    for rel in ["a/0", "b/1/deep", ".hidden/2"]:
        write_results(tmp_path / rel, {"status": "running"})
    found = [p.relative_to(tmp_path).parent.as_posix() for p in iter_results(tmp_path)]
    assert found == ["a/0", "b/1/deep"]
    with pytest.raises(FileNotFoundError, match="no such sweep"):
        list(iter_results(tmp_path / "missing"))


def test_copy_results_keeps_the_run_dir_layout_and_copies_only_what_is_kept(tmp_path):
    source, target = tmp_path / "sweep", tmp_path / "published"
    write_results(source / "bs2/seed0", {"status": "completed", "seed": 0})
    write_results(source / "bs2/seed1", {"status": "interrupted", "seed": 1})
    write_results(source / "bs4/seed0", {"status": "completed", "seed": 2})
    copied = copy_results(source, target, keep=lambda record: record["status"] == "completed")
    assert sorted(p.relative_to(target).as_posix() for p in copied) == ["bs2/seed0/results.json", "bs4/seed0/results.json"]
    assert sorted(p.relative_to(target).as_posix() for p in iter_results(target)) == ["bs2/seed0/results.json", "bs4/seed0/results.json"]
    assert (target / "bs2/seed0" / RESULTS_FILENAME).read_bytes() == (source / "bs2/seed0" / RESULTS_FILENAME).read_bytes()


def test_copy_results_without_overwrite_leaves_a_record_the_target_holds(tmp_path):
    source, target = tmp_path / "published", tmp_path / "sweep"
    write_results(source / "bs2/seed0", {"status": "completed", "seed": 0})
    write_results(source / "bs2/seed1", {"status": "completed", "seed": 1})
    write_results(target / "bs2/seed0", {"status": "running", "seed": 0})
    copied = copy_results(source, target, keep=lambda record: True, overwrite=False)
    assert [p.relative_to(target).as_posix() for p in copied] == ["bs2/seed1/results.json"]
    assert read_results(target / "bs2/seed0")["status"] == "running"
    copy_results(source, target, keep=lambda record: True)
    assert read_results(target / "bs2/seed0")["status"] == "completed"


def test_flatten_uses_dotted_keys():
    assert flatten({"data": {"batch_size": 2, "aug": {"flip": True}}, "seed": 0}) == {
        "data.batch_size": 2,
        "data.aug.flip": True,
        "seed": 0,
    }


def test_summarize_history_reads_the_final_and_best_epochs():
    from mbn.results import METRIC_KEYS, summarize_history

    # A validation split: the best epoch is the validation split's (2), not the test split's (1).
    history = [{"epoch": 1, "train_loss": 2.0, "train_acc1": 0.3, "val_loss": 1.8, "val_acc1": 0.30, "val_acc5": 0.7,
                "test_loss": 1.9, "test_acc1": 0.35, "test_acc5": 0.8},
               {"epoch": 2, "train_loss": 1.5, "train_acc1": 0.5, "val_loss": 1.7, "val_acc1": 0.40, "val_acc5": 0.75,
                "test_loss": 1.6, "test_acc1": 0.33, "test_acc5": 0.85}]
    summary = summarize_history(history)
    assert summary["epochs_completed"] == 2 and set(summary["metrics"]) == set(METRIC_KEYS)
    assert summary["metrics"] == {
        "final_test_acc1": 0.33, "final_test_acc5": 0.85, "final_test_loss": 1.6, "best_test_acc1": 0.35,
        "final_val_acc1": 0.40, "final_val_acc5": 0.75, "final_val_loss": 1.7, "best_val_acc1": 0.40,
        "best_epoch": 2, "best_epoch_test_acc1": 0.33, "final_train_loss": 1.5, "final_train_acc1": 0.5}
    # No validation split (val_* null): the best epoch is the test split's, as best.ckpt's.
    no_val = [{**row, "val_loss": None, "val_acc1": None, "val_acc5": None} for row in history]
    metrics = summarize_history(no_val)["metrics"]
    assert metrics["final_val_acc1"] is metrics["best_val_acc1"] is None
    assert (metrics["best_epoch"], metrics["best_epoch_test_acc1"], metrics["final_test_acc1"]) == (1, 0.35, 0.33)
    assert summarize_history([])["metrics"] == dict.fromkeys(METRIC_KEYS)


def test_a_schema_1_record_reads_its_test_split_numbers_under_test_names_and_keeps_the_val_aliases():
    from mbn.results import upgrade_record

    v1 = {"schema_version": 1, "status": "completed",
          "metrics": {"final_val_acc1": 0.33, "best_val_acc1": 0.35, "best_epoch": 1, "final_val_acc5": 0.85,
                      "final_val_loss": 1.6, "final_test_acc1": 0.33, "best_test_acc1": 0.35},
          "history": [{"epoch": 1, "val_loss": 1.9, "val_acc1": 0.35, "val_acc5": 0.8},
                      {"epoch": 2, "val_loss": 1.6, "val_acc1": 0.33, "val_acc5": 0.85}]}
    upgraded = upgrade_record(v1)
    assert upgraded["schema_version"] == 1 and v1["history"][0].keys() == {"epoch", "val_loss", "val_acc1", "val_acc5"}
    assert upgraded["metrics"] == {**v1["metrics"], "final_test_acc5": 0.85, "final_test_loss": 1.6, "best_epoch_test_acc1": 0.35}
    assert upgraded["history"] == [{**row, "test_loss": row["val_loss"], "test_acc1": row["val_acc1"], "test_acc5": row["val_acc5"]}
                                   for row in v1["history"]]
    v2 = {"schema_version": 2, "status": "completed", "metrics": {"final_val_acc1": 0.4}, "history": []}
    assert upgrade_record(v2) == v2


def test_total_wall_time_adds_the_seconds_of_every_attempt_as_each_record_layout_gives_them():
    from mbn.results import total_wall_time

    attempts = [
        {"started_at": "2026-12-06T10:00:00+00:00", "finished_at": "2026-12-06T10:30:00+00:00", "wall_time_s": 1800.5},
        # written before attempts carried their seconds: its start and end
        {"started_at": "2026-12-06T11:00:00+00:00", "finished_at": "2026-12-06T11:10:00+00:00", "status": "interrupted"},
        # its process died before it finished: nothing known
        {"started_at": "2026-12-06T12:00:00+00:00", "finished_at": None, "status": "running"},
        # the last attempt of an older record: the record's own wall_time_s
        {"started_at": "2026-12-06T13:00:00+00:00", "finished_at": "2026-12-06T13:00:09+00:00", "status": "completed"},
    ]
    assert total_wall_time({"attempts": attempts, "wall_time_s": 9.25}) == 1800.5 + 600.0 + 9.25
    assert total_wall_time({"attempts": attempts[:1], "wall_time_s": 7.0}) == 1800.5  # the attempt's own seconds
    assert total_wall_time({"wall_time_s": 42.0}) == 42.0  # no attempts (a W&B run)
    assert total_wall_time({"attempts": [], "wall_time_s": None}) is None
