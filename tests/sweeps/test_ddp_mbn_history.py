"""MBN under DDP (2 CPU processes): a run's record, and its per-device momentum statistics survive
checkpoints: every rank's M/Phi are in last.ckpt, and a run interrupted after epoch 1 resumes to
exactly the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from test_ddp import M, check_ddp_record

from cli_runner import mbn_train as main
from mbn.results import iter_results, read_results
from mbn.train.ddp_buffers import CHECKPOINT_KEY


def ddp_mbn(tiny, output_root: str, *extra: str) -> list[str]:
    overrides = [o for o in tiny(trainer="ddp_cpu", norm="mbn", epochs=2, **{"data.batch_size": M}) if not o.startswith("output_root=")]
    return [*overrides, f"output_root={output_root}", *extra]


def last_checkpoint(root) -> dict:
    (path,) = iter_results(root)
    return torch.load(path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_every_ranks_momentum_statistics_are_checkpointed_and_resumed_exactly(tiny, run_env, capfd):
    reference_root = run_env / "reference"
    assert main(ddp_mbn(tiny, str(reference_root))) == 0
    # The reference is an ordinary DDP run: its record, and one report line for its 2 processes.
    (reference_path,) = iter_results(reference_root)
    reference = read_results(reference_path)
    check_ddp_record(reference, reference_path.parent)
    # MBN stays per device: T = 2, last epoch lam = 1 - m/m0 with the per-device m.
    assert reference["history"][1]["lam"] == pytest.approx(1 - M / 32)
    out = capfd.readouterr().out  # (the rank processes write to the file descriptors)
    assert "2 DDP processes (torchrun)" in out
    assert out.count("mbn-train: completed") == 1  # reported once, by the job, not by every rank

    # The DDP processes get the job's own overrides: an output_root holding '=' (quoted) works there too.
    root = run_env / "resumed=yes"
    assert main(ddp_mbn(tiny, f"'{root}'", "debug.fail_at_epoch=2")) == 1
    (path,) = iter_results(root)
    assert read_results(path)["epochs_completed"] == 1
    assert main(ddp_mbn(tiny, f"'{root}'")) == 0
    resumed = read_results(path)
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("last.ckpt")
    assert [row["test_loss"] for row in resumed["history"]] == [row["test_loss"] for row in reference["history"]]

    expected, actual = last_checkpoint(reference_root), last_checkpoint(root)
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], value), name
    per_device = expected[CHECKPOINT_KEY]
    assert per_device.keys() == actual[CHECKPOINT_KEY].keys() and per_device
    for name, stacked in per_device.items():
        assert stacked.shape[0] == 2 and torch.equal(actual[CHECKPOINT_KEY][name], stacked), name
        # Row 0 is rank 0's, the state_dict's; rank 1 kept its own history.
        assert torch.equal(stacked[0], expected["state_dict"][name]), name
    means = [name for name in per_device if name.endswith("momentum_mean")]
    assert means and all(not torch.equal(per_device[name][0], per_device[name][1]) for name in means)
