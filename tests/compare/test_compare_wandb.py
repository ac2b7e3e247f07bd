"""W&B runs -> results.json-shaped records, from fake API objects and from real wandb ``Run`` objects fed
recorded GraphQL responses (no network)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from mbn.compare.aggregate import GridSpec, build_grid
from mbn.compare.collect import runset_from_records
from mbn.compare.wandb_source import WandbReadError, fetch_records, normalize_key, run_to_record


class FakeRun:
    """The attributes mbn.compare reads from ``wandb.apis.public.Run``."""

    def __init__(self, run_id: str, config: dict, summary: dict, history: list[dict], state: str = "finished",
                 group: str | None = "demo", tags: list[str] | None = None) -> None:
        self.id = run_id
        self.name = f"name-{run_id}"
        self.config, self.summary, self.state, self.group = config, summary, state, group
        self.tags = tags or []
        self.url = f"https://wandb.example/ent/proj/runs/{run_id}"
        self.path = ["ent", "proj", run_id]
        self._history = history
        self.history_calls: list[dict] = []

    def history(self, samples: int = 500, keys=None, x_axis: str = "_step", pandas: bool = True, stream="default"):
        self.history_calls.append({"samples": samples, "pandas": pandas})
        assert not pandas
        return [dict(row) for row in self._history]


def lightning_history(accs: list[float], lam: list[float] | None = None) -> list[dict[str, Any]]:
    """How Lightning's WandbLogger logs epoch aggregates: 0-based ``epoch``, ``_step``, slash names, split steps."""
    rows = []
    for epoch, acc in enumerate(accs):
        rows.append({"_step": 2 * epoch, "_runtime": 1.0, "epoch": epoch, "train/loss_epoch": 1.0 - acc / 2,
                     "trainer/global_step": 100 * (epoch + 1)})
        row = {"_step": 2 * epoch + 1, "epoch": epoch, "val/acc1": acc, "val/loss": 2 - acc}
        if lam is not None:
            row["mbn/lam"] = lam[epoch]
            row["mbn/tau"] = 0.9
        rows.append(row)
    return rows


def test_normalize_key():
    assert normalize_key("val/acc1_epoch") == "val_acc1"
    assert normalize_key("val/acc1") == "val_acc1"
    assert normalize_key("metrics/best_val_acc1") == "metrics_best_val_acc1"
    assert normalize_key("epoch") == "epoch"


def test_nested_config_summary_metrics_and_lightning_history():
    run = FakeRun(
        "r1",
        config={"norm": {"name": "mbn", "tau0": 0.9}, "data": {"name": "cifar10", "batch_size": 2}, "seed": 1,
                "epochs": 3, "_wandb": {"cli_version": "0.31.0"}},
        summary={"best_val_acc1": 0.61, "final_val_acc1": 0.6, "_step": 5, "_wandb": {"runtime": 12}},
        history=lightning_history([0.4, 0.61, 0.6], lam=[0.5, 0.25, 0.0]),
        tags=["mbn", "m=2"],
    )
    record = run_to_record(run)
    assert record["status"] == "completed" and record["error"] is None
    assert record["config"] == {"norm": {"name": "mbn", "tau0": 0.9}, "data": {"name": "cifar10", "batch_size": 2},
                                "seed": 1, "epochs": 3, "sweep_name": "demo"}
    assert record["metrics"]["best_val_acc1"] == 0.61 and record["metrics"]["final_val_acc1"] == 0.6
    assert record["metrics"]["best_epoch"] == 2  # derived from history, 1-based
    assert [row["epoch"] for row in record["history"]] == [1, 2, 3]
    assert [row["val_acc1"] for row in record["history"]] == [0.4, 0.61, 0.6]
    assert [row["lam"] for row in record["history"]] == [0.5, 0.25, 0.0]
    assert record["history"][0]["train_loss"] == 0.8  # train/loss_epoch merged into the same epoch row
    assert record["epochs_completed"] == 3
    assert record["output_dir"] == "https://wandb.example/ent/proj/runs/r1"
    assert record["wandb"]["tags"] == ["mbn", "m=2"]
    assert run.history_calls and run.history_calls[0]["samples"] >= 10_000


def test_mbn_train_logging_layout():
    """What mbn/train/loggers.py logs: the resolved config plus derived top-level keys; metrics via self.log."""
    config = {"norm": {"name": "mbn"}, "data": {"name": "fake", "batch_size": 2}, "seed": 0, "epochs": 2,
              "sweep_name": "demo", "norm_name": "mbn", "batch_size": 2, "global_batch_size": 2, "world_size": 1,
              "config_hash": "1f3a5b7c9d0e2f4a", "output_dir": "/x/outputs/sweeps/demo/norm=mbn,seed=0"}
    run = FakeRun("r3", config=config, summary={"val/acc1": 0.5, "mbn/lam": 0.0},
                  history=lightning_history([0.45, 0.5], lam=[0.3, 0.0]))
    record = run_to_record(run)
    assert record["config"] == {"norm": {"name": "mbn"}, "data": {"name": "fake", "batch_size": 2}, "seed": 0,
                                "epochs": 2, "sweep_name": "demo"}
    assert (record["norm"], record["batch_size"], record["config_hash"]) == ("mbn", 2, "1f3a5b7c9d0e2f4a")
    assert record["wandb"]["local_output_dir"] == "/x/outputs/sweeps/demo/norm=mbn,seed=0"
    assert record["metrics"]["best_val_acc1"] == 0.5
    runset = runset_from_records([("w", record)])
    assert "output_dir" not in runset.config_keys and "batch_size" not in runset.config_keys
    assert runset.runs.at[0, "config_hash"] == "1f3a5b7c9d0e2f4a"


def test_flat_dotted_config_and_metrics_derived_from_history():
    run = FakeRun("r2", config={"norm.name": "bn", "data.batch_size": 8, "seed": 0}, summary={},
                  history=lightning_history([0.3, 0.5, 0.45]))
    record = run_to_record(run)
    assert record["config"]["norm"] == {"name": "bn"} and record["config"]["data"] == {"batch_size": 8}
    assert record["metrics"]["best_val_acc1"] == 0.5
    assert record["metrics"]["final_val_acc1"] == 0.45
    assert record["metrics"]["final_val_loss"] == pytest.approx(1.55)


@pytest.mark.parametrize("state, summary, status", [
    ("finished", {}, "completed"),
    ("running", {}, "running"),
    ("crashed", {}, "failed"),
    ("failed", {}, "failed"),
    ("killed", {}, "interrupted"),
    ("finished", {"status": "diverged", "error": "loss is nan at epoch 2"}, "diverged"),
])
def test_status_mapping(state, summary, status):
    record = run_to_record(FakeRun("r", config={"seed": 0}, summary=summary, history=[], state=state))
    assert record["status"] == status
    if state == "crashed":
        assert record["error"] == "W&B run state: crashed"
    if summary.get("error"):
        assert record["error"] == summary["error"]


class FakeApi:
    def __init__(self, runs: list[Any] | None = None, error: Exception | None = None) -> None:
        self._runs, self._error = runs or [], error
        self.calls: list[tuple[str, Any]] = []

    def runs(self, path: str, filters: dict | None = None, **kwargs: Any):
        self.calls.append((path, filters))
        if self._error:
            raise self._error
        return iter(self._runs)


def test_fetch_records_filters_group_reports_progress_and_keeps_bad_runs():
    class BrokenRun(FakeRun):
        def history(self, **kwargs):
            raise RuntimeError("history endpoint returned 500")

    good = FakeRun("g", config={"norm": {"name": "bn"}, "data": {"batch_size": 2}, "seed": 0},
                   summary={"best_val_acc1": 0.5}, history=[])
    bad = BrokenRun("b", config={}, summary={}, history=[])
    api = FakeApi([good, bad])
    progress = io.StringIO()
    records = fetch_records("ent/proj", "demo", api=api, progress=progress)
    assert api.calls == [("ent/proj", {"group": "demo"})]
    assert progress.getvalue().strip().endswith("reading W&B run 2/2")
    assert records[0][1]["metrics"]["best_val_acc1"] == 0.5
    assert isinstance(records[1][1], RuntimeError)
    runset = runset_from_records(records)
    assert list(runset.runs["status"]) == ["completed", "unreadable"]
    assert runset.runs["error"].iloc[1] == "RuntimeError: history endpoint returned 500"


def test_fetch_records_errors_are_clear():
    with pytest.raises(ValueError, match="ENTITY/PROJECT.*'proj'"):
        fetch_records("proj", api=FakeApi())
    with pytest.raises(WandbReadError, match="could not read W&B runs of 'ent/proj'.*ConnectionError: network is down"):
        fetch_records("ent/proj", api=FakeApi(error=ConnectionError("network is down")), progress=None)


# --- real wandb.apis.public.Run objects with recorded GraphQL responses -------------------------------

class RecordedServiceApi:
    """Stands in for wandb's service API: answers the history query with recorded rows."""

    app_url = "https://wandb.example/"

    def __init__(self, history: list[dict[str, Any]]) -> None:
        self.history = history
        self.queries: list[str] = []

    def execute_graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        self.queries.append(query)
        if "RunFullHistory" in query:
            return {"project": {"run": {"history": [json.dumps(row) for row in self.history]}}}
        raise AssertionError(f"unexpected query {query[:80]!r}")


def recorded_run_attrs(run_id: str, norm: str, m: int, seed: int, state: str, summary: dict) -> dict[str, Any]:
    """A run node as the W&B GraphQL API returns it (config/summary as JSON strings, config values wrapped)."""
    config = {"norm": {"name": norm}, "data": {"name": "cifar10_archive", "batch_size": m}, "seed": seed,
              "epochs": 2, "sweep_name": "demo"}
    return {
        "id": f"UnVuOnYx{run_id}", "name": run_id, "displayName": f"{norm}-m{m}-s{seed}", "state": state,
        "group": "demo", "jobType": "train", "tags": [norm, f"m={m}"], "sweepName": None,
        "config": json.dumps({k: {"value": v, "desc": None} for k, v in config.items()}
                             | {"_wandb": {"value": {"cli_version": "0.31.0"}}}),
        "summaryMetrics": json.dumps({**summary, "_step": 3, "_runtime": 40.2}),
        "systemMetrics": "{}", "historyLineCount": 4, "createdAt": "2026-11-25T12:00:00",
    }


def test_real_wandb_run_objects_convert(monkeypatch, tmp_path):
    from wandb.apis.public.runs import Run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # Run() makes a download dir there
    runs = []
    for run_id, (norm, seed, accs, state) in {
        "a1": ("bn", 0, [0.3, 0.5], "finished"),
        "a2": ("bn", 1, [0.35, 0.55], "finished"),
        "a3": ("mbn", 0, [0.4, 0.6], "finished"),
        "a4": ("mbn", 1, [0.42], "crashed"),
    }.items():
        history = lightning_history(accs)
        summary = {"best_val_acc1": max(accs), "val/acc1": accs[-1]}
        attrs = recorded_run_attrs(run_id, norm, 2, seed, state, summary)
        runs.append(Run(RecordedServiceApi(history), "ent", "proj", run_id, attrs=attrs, lazy=True))
    records = fetch_records("ent/proj", api=FakeApi(runs), progress=None)
    assert [r[0] for r in records][0] == "https://wandb.example/ent/proj/runs/a1"
    first = records[0][1]
    assert first["config"] == {"norm": {"name": "bn"}, "data": {"name": "cifar10_archive", "batch_size": 2},
                               "seed": 0, "epochs": 2, "sweep_name": "demo"}
    assert first["wandb"]["group"] == "demo" and first["wandb"]["tags"] == ["bn", "m=2"]
    assert [row["val_acc1"] for row in first["history"]] == [0.3, 0.5]
    runset = runset_from_records(records)
    assert list(runset.runs["status"]) == ["completed", "completed", "completed", "failed"]
    grid = build_grid(runset, GridSpec(metric="best_val_acc1"))
    assert grid.cell(("bn",), 2).values == [0.5, 0.55]
    assert grid.cell(("mbn",), 2).values == [0.6]


def test_real_run_class_has_the_attributes_we_read():
    from wandb.apis.public.runs import Run

    for name in ("config", "summary", "state", "name", "id", "url", "path", "history"):
        assert hasattr(Run, name), name


# Recorded from the offline W&B run of a real `mbn-train -m data=fake norm=mbn data.batch_size=4 epochs=2
# model.width=4 'logger=[csv,wandb]'` job (its .wandb file): Lightning logs val and train aggregates in
# separate steps, with 0-based epochs and slash-separated names.
RECORDED_CONFIG = {
    "seed": 0, "epochs": 2, "sweep_name": "e2e", "output_root": "/tmp/h4/e2e",
    "paths": {"data_root": "/work/main/../shared/data", "cache_dir": None},
    "data": {"name": "fake", "source": {"num_train": 64, "num_test": 32, "num_classes": 10, "image_size": 16,
                                        "channels": 3, "seed": 0},
             "batch_size": 4, "eval_batch_size": 64, "train_subset": None, "augment": False},
    "model": {"name": "resnet18", "width": 4, "zero_init_residual": False},
    "norm": {"name": "mbn", "ideal_batch_size": 32, "tau0": 0.9, "schedule": "epoch", "fixed_lam": None, "eps": 1e-05},
    "optim": {"name": "sgd", "base_lr": 0.1, "milestones": [0.3, 0.6, 0.9]},
    "logger": {"csv": {}, "wandb": {"project": "mbn", "entity": None, "offline": True, "job_type": "train", "tags": []}},
    "norm_name": "mbn", "batch_size": 4, "global_batch_size": 4, "world_size": 1, "config_hash": "2d5bfce6291b58b7",
    "output_dir": "/tmp/h4/e2e/sweeps/e2e/norm=mbn",
}
RECORDED_HISTORY = [
    {"val/acc5": 0.46875, "epoch": 0, "trainer/global_step": 15, "_timestamp": 1795609541.3198721,
     "_runtime": 6.4291582, "_step": 0, "val/loss": 2.5282998085021973, "val/acc1": 0.09375},
    {"mbn/lam": 2.7755575615628914e-17, "train/acc1": 0.046875, "lr": 0.0062500000931322575,
     "trainer/global_step": 15, "_runtime": 6.4901257, "_step": 1, "mbn/tau": 0.9869163036346436,
     "train/loss": 2.47654390335083, "epoch": 0, "_timestamp": 1795609541.3918147},
    {"val/acc1": 0.125, "val/acc5": 0.4375, "epoch": 1, "trainer/global_step": 31, "_timestamp": 1795609546.2214093,
     "_runtime": 11.318168929, "_step": 2, "val/loss": 2.404327154159546},
    {"lr": 0.0006249999860301614, "trainer/global_step": 31, "_timestamp": 1795609546.2778523,
     "_runtime": 11.374459257, "mbn/tau": 0.9869163036346436, "train/acc1": 0.1875, "epoch": 1, "_step": 3,
     "mbn/lam": 0.875, "train/loss": 2.175166130065918},
]
RECORDED_SUMMARY = {
    "_wandb": {"runtime": 11}, "_runtime": 11, "epoch": 1, "trainer/global_step": 31, "_step": 3,
    "val/loss": 2.404327154159546, "val/acc1": 0.125, "val/acc5": 0.4375, "train/acc1": 0.1875,
    "lr": 0.0006249999860301614, "mbn/tau": 0.9869163036346436, "train/loss": 2.175166130065918, "mbn/lam": 0.875,
}


def test_recorded_mbn_train_run(monkeypatch, tmp_path):
    from wandb.apis.public.runs import Run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    attrs = {
        "id": "UnVuOnYxOnlzZG9seHRh", "name": "ysdolxta", "displayName": "norm=mbn", "state": "finished",
        "group": "e2e", "jobType": "train", "tags": ["norm=mbn", "m=4", "model=resnet18", "data=fake"],
        "config": json.dumps({k: {"value": v, "desc": None} for k, v in RECORDED_CONFIG.items()}),
        "summaryMetrics": json.dumps(RECORDED_SUMMARY), "systemMetrics": "{}", "sweepName": None,
    }
    run = Run(RecordedServiceApi(RECORDED_HISTORY), "ent", "mbn", "ysdolxta", attrs=attrs, lazy=True)
    record = run_to_record(run)
    assert record["status"] == "completed"
    assert [row["epoch"] for row in record["history"]] == [1, 2]
    assert [row["val_acc1"] for row in record["history"]] == [0.09375, 0.125]
    assert [row["lam"] for row in record["history"]] == [2.7755575615628914e-17, 0.875]
    assert record["history"][1]["train_loss"] == 2.175166130065918 and record["history"][1]["tau"] > 0.98
    assert record["metrics"] == {
        "best_val_acc1": 0.125, "final_val_acc1": 0.125, "final_val_acc5": 0.4375,
        "final_val_loss": 2.404327154159546, "final_train_loss": 2.175166130065918, "best_epoch": 2,
        "final_train_acc1": 0.1875,
    }
    assert record["config"]["norm"]["tau0"] == 0.9 and "config_hash" not in record["config"]
    runset = runset_from_records([(record["output_dir"], record)])
    assert runset.runs.at[0, "norm.name"] == "mbn" and runset.runs.at[0, "data.batch_size"] == 4
    assert runset.runs.at[0, "run_dir"] == "https://wandb.example/ent/mbn/runs/ysdolxta"
