"""DDP with 2 CPU processes (gloo): one run, and 2 DDP jobs inside one Hydra multirun.

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


def test_ddp_run_on_two_cpu_processes(tiny, run_env, capfd):
    assert main(ddp_overrides(tiny, norm="mbn")) == 0
    (path,) = iter_results(run_env)
    record = read_results(path)
    check_ddp_record(record, path.parent)
    # MBN stays per device: T = 2, last epoch lam = 1 - m/m0 with the per-device m.
    assert record["history"][1]["lam"] == pytest.approx(1 - M / 32)
    out = capfd.readouterr().out  # (the rank processes write to the file descriptors)
    assert "2 DDP processes (torchrun)" in out
    assert out.count("mbn-train: completed") == 1  # reported once, by the job, not by every rank


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
