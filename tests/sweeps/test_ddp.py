"""DDP with 2 CPU processes (gloo): 2 DDP jobs inside one Hydra multirun (a single DDP MBN run is
checked in test_ddp_mbn_history.py, whose reference run it is).

``mbn-train`` starts each DDP job's processes itself (torchrun) with the job's own overrides and
dir, so it works in a multirun where Lightning's re-run of ``sys.argv`` would start the whole sweep.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from sweep_helpers import sweep_runs

from cli_runner import mbn_train as main
from mbn.results import iter_results, read_results

M = 4  # per-device (normalization) batch size


def ddp_overrides(tiny, **extra):
    return tiny(**{"trainer": "ddp_cpu", "data.batch_size": M, "epochs": 2, **extra})


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


def test_two_ddp_jobs_inside_one_multirun(tiny, run_env, capsys):
    assert main(["-m", *ddp_overrides(tiny), "norm=bn,brn", "sweep_name=ddp"]) == 0
    assert "mbn-train: sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in capsys.readouterr().out
    runs = sweep_runs(run_env / "sweeps" / "ddp")
    assert sorted(r["norm"] for r in runs.values()) == ["bn", "brn"]
    for name, record in runs.items():
        check_ddp_record(record, run_env / "sweeps" / "ddp" / name)
    # Rerun: both skipped without starting any process.
    assert main(["-m", *ddp_overrides(tiny), "norm=bn,brn", "sweep_name=ddp"]) == 0
    out = capsys.readouterr().out
    assert "0 completed, 0 failed, 2 skipped" in out and "DDP processes" not in out
