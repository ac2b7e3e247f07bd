"""A sweep killed with SIGKILL midway, rerun with the same command, ends as if never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from sweep_helpers import assert_same_run, job_dir, sweep_runs

from cli_runner import mbn_train as main
from mbn.results import read_results

# 2 epochs of 32 steps (~0.5 s each on 2 cores, 25 times the poll that sees epoch 1 on disk): epoch 2
# of a job outlasts that poll.
KILL_OVERRIDES = {"data.source.num_train": 256, "epochs": 2, "norm": "mbn"}
# Three jobs are the three cases: completed before the kill, killed midway, never started.
SEEDS = (0, 1, 2)


def wait_for_epoch_one(run_dir: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Return once ``run_dir`` has recorded epoch 1 and its checkpoint is complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if read_results(run_dir)["epochs_completed"] >= 1:
                torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                return
        except (OSError, ValueError, RuntimeError, EOFError, json.JSONDecodeError):
            pass  # not there yet
        time.sleep(0.02)
    raise AssertionError(f"{run_dir} did not finish epoch 1 in time")


def test_sigkill_midway_then_rerun_completes_every_run_exactly_once(tiny, run_env, tmp_path, capsys):
    overrides = [*tiny(**KILL_OVERRIDES), f"seed={','.join(map(str, SEEDS))}", "sweep_name=kill"]
    reference_root = tmp_path / "reference"
    assert main(["-m", *overrides, f"output_root={reference_root}"]) == 0
    reference_dir = reference_root / "sweeps" / "kill"
    reference = sweep_runs(reference_dir)
    assert len(reference) == len(SEEDS)

    sweep_dir = run_env / "sweeps" / "kill"
    second_job = sweep_dir / job_dir(reference_dir, "seed=1").name
    proc = subprocess.Popen([sys.executable, "-m", "mbn.cli.train", "-m", *overrides], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_epoch_one(second_job, proc)  # job 1 completed, job 2 mid-run
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = sweep_runs(sweep_dir)
    assert sorted(r["status"] for r in killed.values()) == ["completed", "running"]  # job 3 never started

    capsys.readouterr()
    assert main(["-m", *overrides]) == 0
    assert "mbn-train: sweep done: 2 completed, 0 failed, 1 skipped (of 3 jobs)" in capsys.readouterr().out
    final = sweep_runs(sweep_dir)
    assert final.keys() == reference.keys()
    for name, record in final.items():
        assert record["status"] == "completed"
        attempts = [a["status"] for a in record["attempts"]]
        assert attempts.count("completed") == 1, (name, attempts)
        if name == second_job.name:  # killed after epoch 1, resumed from its checkpoint
            assert attempts == ["running", "completed"]
            assert record["attempts"][1]["resumed_from"] == str(second_job.resolve() / "checkpoints" / "last.ckpt")
        else:
            assert attempts == ["completed"], (name, attempts)
        assert_same_run(record, reference[name], sweep_dir / name, reference_dir / name)
