"""TensorBoard's HParams dashboard: every run's hyperparameters with its final metrics, read back from
the event files with TensorBoard's own reader."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cli_runner import mbn_train as main
from mbn.results import iter_results, read_results


def hparams_of(event_dir) -> tuple[dict, set[str], EventAccumulator]:
    """(the session's hyperparameters, the hparams plugin's tags, the loaded events) of one event dir."""
    events = EventAccumulator(str(event_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in session.hparams.items()}
    return values, set(content), events


@pytest.mark.parametrize("stack", [1, 2], ids=["single_runs", "stacked_seeds"])
def test_each_run_writes_its_hparams_with_its_final_metrics(tiny, run_env, stack):
    """Runs trained alone and the members of stacks (one lifecycle) write the same dashboard records."""
    assert main(["-m", *tiny(**{"logger": "[csv,tensorboard]", "epochs": 2}), "norm=bn,mbn", "seed=0,1", f"stack={stack}"]) == 0
    runs = list(iter_results(run_env))
    assert len(runs) == 4
    seen = set()
    for path in runs:
        record = read_results(path)
        (event_dir,) = {p.parent for p in (path.parent / "tensorboard").rglob("events.out.tfevents.*")}
        hparams, plugin_tags, events = hparams_of(event_dir)
        assert (hparams["norm"], hparams["batch_size"], hparams["seed"]) == (record["norm"], 8, record["config"]["seed"])
        assert hparams["model"] == "resnet18" and hparams["width"] == 4 and hparams["epochs"] == 2
        # A session per run and no per-run experiment: TensorBoard builds the experiment from all runs
        # and lists the hyperparameters that differ between them first.
        assert plugin_tags == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
        assert {"final/test_acc1", "final/test_loss", "final/train_loss"} <= set(events.Tags()["scalars"])
        metrics = record["metrics"]
        assert events.Scalars("final/test_acc1")[-1].value == pytest.approx(metrics["final_test_acc1"])
        assert "final/val_acc1" not in events.Tags()["scalars"]  # no validation split: no val metric
        assert events.Scalars("final/train_loss")[-1].value == pytest.approx(metrics["final_train_loss"])
        # The epoch rows, under the single run's names.
        assert [event.value for event in events.Scalars("test/acc1")] == pytest.approx([row["test_acc1"] for row in record["history"]])
        seen.add((hparams["norm"], hparams["seed"]))
    assert seen == {("bn", 0), ("bn", 1), ("mbn", 0), ("mbn", 1)}


def test_without_the_tensorboard_logger_nothing_is_written(tiny, run_env):
    assert main(tiny()) == 0
    (path,) = iter_results(run_env)
    assert not (path.parent / "tensorboard").exists()
