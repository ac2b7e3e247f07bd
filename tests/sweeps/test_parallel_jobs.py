"""``hydra/launcher=joblib``: jobs run in parallel worker processes, each pinned to its share of the CPU."""

from __future__ import annotations

import os

from sweep_helpers import sweep_runs

from cli_runner import mbn_train as main
from mbn.train.resources import cpu_cores


def test_joblib_sweep_runs_two_pinned_jobs_in_parallel_workers_and_reports_them(tiny, run_env, capsys):
    argv = ["-m", *tiny(**{"trainer.num_threads": "null"}), "seed=0,1", "data.source.num_classes=1,4",
            "sweep_name=par", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    assert main(argv) == 1  # the two num_classes=1 jobs fail; the other two are not affected
    out = capsys.readouterr().out
    assert "mbn-train: sweep done: 2 completed, 2 failed, 0 skipped (of 4 jobs)" in out
    runs = sweep_runs(run_env / "sweeps" / "par")
    assert sorted(r["status"] for r in runs.values()) == ["completed", "completed", "failed", "failed"]
    attempts = [r["attempts"][0] for r in runs.values()]
    pids = {a["pid"] for a in attempts}
    assert os.getpid() not in pids and len(pids) <= 2  # joblib worker processes, not this one
    assert {a["num_threads"] for a in attempts} == {max(1, cpu_cores() // 2)}
    assert all(a["cuda_visible_devices"] is None for a in attempts)  # no GPU here: nothing to pin

    # Rerun: the completed jobs are skipped, from the workers too.
    assert main(argv) == 1
    assert "mbn-train: sweep done: 0 completed, 2 failed, 2 skipped (of 4 jobs)" in capsys.readouterr().out
