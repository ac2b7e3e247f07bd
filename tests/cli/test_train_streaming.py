"""mbn-train on a class-folder tree streamed from disk (data.in_memory=false): trains, resumes exactly;
the in-memory path stops at start-up when the decoded dataset does not fit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import mbn_train as main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from data_layouts import make_tree, random_images, write_dir  # noqa: E402

import mbn.data.memory  # noqa: E402
from mbn.results import iter_results, read_results  # noqa: E402


@pytest.fixture
def tree_overrides(tmp_path, run_env):
    """A 3-class tree of 10x12 PNGs (8 train, 2 val images per class) and the overrides of a tiny run on it."""
    rng = np.random.default_rng(0)
    splits = {"train": {c: random_images(rng, 8, (10, 12)) for c in "abc"}, "val": {c: random_images(rng, 2, (10, 12)) for c in "abc"}}
    root = write_dir(tmp_path / "tree", make_tree(splits))
    return lambda output_root, *extra: [
        "data=imagefolder", f"data.source.root={root}", "data.source.image_size=8", "data.batch_size=4",
        "data.eval_batch_size=4", "data.in_memory=false", "data.num_workers=2", "model.width=4", "epochs=2",
        "trainer.num_threads=1", "logger=[csv]", f"paths.cache_dir={tmp_path / 'cache'}", f"output_root={output_root}", *extra,
    ]


def run_dir_of(root: Path) -> Path:
    (path,) = iter_results(root)
    return path.parent


def test_a_streamed_run_interrupted_after_epoch_1_resumes_to_the_same_weights(tree_overrides, run_env, tmp_path):
    reference = tmp_path / "reference"
    assert main(tree_overrides(reference)) == 0
    assert main(tree_overrides(run_env, "debug.fail_at_epoch=2")) == 1
    assert read_results(run_dir_of(run_env))["epochs_completed"] == 1
    assert main(tree_overrides(run_env)) == 0
    resumed, expected = read_results(run_dir_of(run_env)), read_results(run_dir_of(reference))
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("last.ckpt")
    for key in ("train_loss", "test_loss", "test_acc1"):
        assert [row[key] for row in resumed["history"]] == [row[key] for row in expected["history"]]
    states = [torch.load(run_dir_of(root) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
              for root in (reference, run_env)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_the_in_memory_path_stops_at_start_up_when_the_dataset_does_not_fit(tree_overrides, run_env, monkeypatch, capsys):
    monkeypatch.setattr(mbn.data.memory, "available_memory_bytes", lambda: 1000)
    assert main(tree_overrides(run_env, "data.in_memory=true")) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mbn-train:")]
    assert len(lines) == 1 and lines[0].startswith("mbn-train: failed ")
    assert "decoding it into memory needs 0.0 GB (30 images at 8x8), 0.0 GB are available" in lines[0]
    assert lines[0].endswith("stream the images from disk instead with data.in_memory=false")
    assert read_results(run_dir_of(run_env))["epochs_completed"] == 0
