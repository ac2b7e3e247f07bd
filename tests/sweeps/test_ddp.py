"""DDP with 2 CPU processes (gloo): 2 DDP jobs inside one Hydra multirun, and MBN's per-device momentum
statistics in checkpoints: every rank's M/Phi are in last.ckpt, and a run interrupted after epoch 1
resumes to exactly the multirun's uninterrupted job.

``mbn-train`` starts each DDP job's processes itself (torchrun) with the job's own overrides and
dir, so it works in a multirun where Lightning's re-run of ``sys.argv`` would start the whole sweep.
One test: its four DDP launches (the 2 jobs, an interrupted run and its resume) share one reference run
(each launch starts 2 processes).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from sweep_helpers import job_dir, sweep_runs

from cli_runner import mbn_train as main
from mbn.results import iter_results, read_results
from mbn.train.ddp_buffers import CHECKPOINT_KEY

M = 4  # per-device (normalization) batch size


def ddp_overrides(tiny, *extra: str) -> list[str]:
    return [*tiny(trainer="ddp_cpu", epochs=2, **{"data.batch_size": M}), *extra]


def check_ddp_record(record: dict, run_dir) -> None:
    assert record["status"] == "completed", record.get("error")
    assert (record["batch_size"], record["world_size"], record["global_batch_size"]) == (M, 2, 2 * M)
    assert record["lr"] == pytest.approx(0.1 * 2 * M / 64)  # linear scaling with the global batch
    assert record["history"][0]["lr"] == pytest.approx(0.1 * 2 * M / 64)
    # 64 fake images over 2 processes of M each: 8 steps per epoch; the step schedule decays at 30%.
    assert record["history"][1]["lr"] == pytest.approx(0.1 * 2 * M / 64 / 10)
    assert len(record["attempts"]) == 1 and record["epochs_completed"] == 2
    (hparams,) = run_dir.glob("csv/version_*/hparams.yaml")
    assert yaml.safe_load(hparams.read_text()) == {
        "batch_size_per_device": M, "world_size": 2, "global_batch_size": 2 * M, "lr": pytest.approx(0.1 * 2 * M / 64),
    }
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 * 64 // (2 * M)


def last_checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_two_ddp_jobs_in_one_multirun_and_every_ranks_momentum_statistics_resume_exactly(tiny, run_env, capfd):
    sweep_dir = run_env / "sweeps" / "ddp"
    assert main(["-m", *ddp_overrides(tiny, "norm=bn,mbn", "sweep_name=ddp")]) == 0
    out = capfd.readouterr().out  # (the rank processes write to the file descriptors)
    assert "mbn-train: sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in out
    assert out.count("2 DDP processes (torchrun)") == 2
    assert out.count("mbn-train: completed") == 2  # reported once per job, by the job, not by every rank
    runs = sweep_runs(sweep_dir)
    assert sorted(r["norm"] for r in runs.values()) == ["bn", "mbn"]
    for name, record in runs.items():
        check_ddp_record(record, sweep_dir / name)
    reference_dir = job_dir(sweep_dir, "norm=mbn")
    reference = runs[reference_dir.name]
    # MBN stays per device: T = 2, last epoch lam = 1 - m/m0 with the per-device m.
    assert reference["history"][1]["lam"] == pytest.approx(1 - M / 32)
    # Rerun: both skipped without starting any process.
    assert main(["-m", *ddp_overrides(tiny, "norm=bn,mbn", "sweep_name=ddp")]) == 0
    out = capfd.readouterr().out
    assert "0 completed, 0 failed, 2 skipped" in out and "DDP processes" not in out

    # The DDP processes get the job's own overrides: an output_root holding '=' (quoted) works there too.
    root = run_env / "resumed=yes"
    single = [o for o in ddp_overrides(tiny, "norm=mbn") if not o.startswith("output_root=")] + [f"output_root='{root}'"]
    assert main([*single, "debug.fail_at_epoch=2"]) == 1
    (path,) = iter_results(root)
    assert read_results(path)["epochs_completed"] == 1
    assert main(single) == 0
    resumed = read_results(path)
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["config_hash"] == reference["config_hash"]
    assert [row["test_loss"] for row in resumed["history"]] == [row["test_loss"] for row in reference["history"]]

    expected, actual = last_checkpoint(reference_dir), last_checkpoint(path.parent)
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
