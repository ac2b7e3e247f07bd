"""A sweep survives failing jobs, checks every job's config up front, and reruns idempotently.

Real Hydra multiruns through ``mbn-train``'s ``main()`` (Hydra's in-process launcher), tiny runs.
"""

from __future__ import annotations

import json

from sweep_helpers import job_dir, sweep_runs

from cli_runner import mbn_train as main

from mbn.cli.config import job_dirname
from mbn.train.run_dir import job_lock
from mbn.results import iter_results, read_results


def test_one_failing_job_never_stops_the_sweep_and_sets_the_exit_code(tiny, run_env, capsys):
    # num_classes=1 passes config validation but the data generator raises when the job runs.
    argv = ["-m", *tiny(), "seed=0,1", "data.source.num_classes=1,3", "sweep_name=faults"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    sweep_dir = run_env / "sweeps" / "faults"
    runs = sweep_runs(sweep_dir)
    assert len(runs) == 4
    statuses = {(r["seed"], r["config"]["data"]["source"]["num_classes"]): r["status"] for r in runs.values()}
    assert statuses == {(0, 1): "failed", (0, 3): "completed", (1, 1): "failed", (1, 3): "completed"}
    assert "mbn-train: sweep done: 2 completed, 2 failed, 0 skipped (of 4 jobs)" in out
    for seed in (0, 1):
        failed_dir = job_dir(sweep_dir, f"seed={seed}", "data.source.num_classes=1")
        assert f"mbn-train:   failed: {failed_dir} - ValueError: num_classes must be at least 2, got 1" in out
        assert "Traceback" in read_results(failed_dir)["traceback"]

    # Rerun: completed jobs are skipped, failed ones are run again (and fail again here).
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "mbn-train: sweep done: 0 completed, 2 failed, 2 skipped (of 4 jobs)" in out
    again = sweep_runs(sweep_dir)
    for name, record in again.items():
        expected = ["failed", "failed"] if record["status"] == "failed" else ["completed"]
        assert [a["status"] for a in record["attempts"]] == expected, name


def test_an_invalid_swept_value_stops_the_sweep_before_any_job_runs(tiny, run_env, capsys):
    code = main(["-m", *tiny(), "data.batch_size=8,0,4", "sweep_name=bad"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "data.batch_size=0: data.batch_size: must be a positive integer, got 0" in err
    assert "mbn-train: sweep not started: 1 of 3 jobs have an invalid config" in err
    assert "Traceback" not in out + err
    assert not list(run_env.rglob("results.json")), "no job may run when one job's config is invalid"

    # An unknown config-group option in a sweep is caught the same way (Hydra composition error).
    assert main(["-m", *tiny(), "norm=bn,foo", "sweep_name=bad"]) == 2
    err = capsys.readouterr().err
    assert "norm=foo: norm: unknown option 'foo'; expected one of bn, brn, brn_epochs, cbn, evonorm_b0, evonorm_s0, frn, gn, mabn, mbn, none" in err
    assert not list(run_env.rglob("results.json"))


def test_dry_run_lists_what_would_run_skip_resume_or_replace_without_training(tiny, run_env, capsys):
    base = [*tiny(epochs=2), "sweep_name=dry"]
    assert main(["-m", *base, "seed=0,3"]) == 0
    # seed=1 fails when its epoch 2 starts: epoch 1 is checkpointed. fail_at_epoch is not part of
    # the job's identity (dir name, config hash), so the plain command below resumes it.
    assert main(["-m", *base, "seed=1", "debug.fail_at_epoch=2"]) == 1
    sweep_dir = run_env / "sweeps" / "dry"
    replaced = job_dir(sweep_dir, "seed=3")
    record = json.loads((replaced / "results.json").read_text())
    (replaced / "results.json").write_text(json.dumps({**record, "config_hash": "0" * 16}))  # an edited experiment
    capsys.readouterr()
    before = {path: path.read_bytes() for path in iter_results(sweep_dir)}

    assert main(["-m", *base, "seed=0,1,2,3", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert f"mbn-train: would skip {job_dir(sweep_dir, 'seed=0')} (completed)" in out
    assert f"mbn-train: would resume {job_dir(sweep_dir, 'seed=1')} (failed after epoch 1)" in out
    assert f"mbn-train: would start {sweep_dir / job_dir(sweep_dir, 'seed=0').name.replace('seed=0', 'seed=2')} (new)" in out
    assert f"mbn-train: would replace {replaced} (holds another config (hash {'0' * 16}))" in out
    assert "mbn-train: dry run of 4 jobs: 1 replace, 1 resume, 1 skip, 1 start; nothing was run" in out
    assert {path: path.read_bytes() for path in iter_results(sweep_dir)} == before
    assert not any("seed=2" in p.name for p in sweep_dir.iterdir())

    # The real rerun does exactly that.
    assert main(["-m", *base, "seed=0,1,2,3"]) == 0
    assert "sweep done: 3 completed, 0 failed, 1 skipped (of 4 jobs)" in capsys.readouterr().out
    resumed = read_results(job_dir(sweep_dir, "seed=1"))
    assert [a["status"] for a in resumed["attempts"]] == ["failed", "completed"]
    assert resumed["attempts"][1]["resumed_from"].endswith("last.ckpt")
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert len(read_results(job_dir(sweep_dir, "seed=0"))["attempts"]) == 1
    assert list((replaced / ".replaced").iterdir())[0].name == "0" * 16


def test_diverged_runs_are_final_unless_rerun_diverged(tiny, run_env, capsys):
    argv = ["-m", *tiny(**{"optim.base_lr": 1e12, "epochs": 3, "trainer.check_finite_every_n_steps": 1}), "seed=0", "sweep_name=div"]
    assert main(argv) == 3
    sweep_dir = run_env / "sweeps" / "div"
    (run_dir,) = [path.parent for path in iter_results(sweep_dir)]
    first = read_results(run_dir)
    assert first["status"] == "diverged"
    capsys.readouterr()

    assert main(argv) == 3  # kept: a rerun would diverge the same way
    out = capsys.readouterr().out
    assert f"mbn-train: diverged {run_dir}" in out and "skipped: already diverged" in out
    assert "sweep done: 0 completed, 0 failed, 1 diverged, 0 skipped (of 1 jobs)" in out
    assert read_results(run_dir) == first

    assert main([*argv, "rerun_diverged=true"]) == 3  # restarted from scratch, the old run moved aside
    again = read_results(run_dir)
    assert again["status"] == "diverged" and again["started_at"] >= first["started_at"]
    assert len(again["attempts"]) == 1 and again["attempts"][0]["resumed_from"] is None
    (moved,) = (run_dir / ".replaced").iterdir()
    assert read_results(moved)["attempts"] == first["attempts"]


def test_a_diverged_single_run_exits_3_when_run_again_as_in_a_sweep(tiny, run_env, capsys):
    argv = tiny(**{"optim.base_lr": 1e12, "epochs": 2, "trainer.check_finite_every_n_steps": 1})
    assert main(argv) == 3
    capsys.readouterr()
    assert main(argv) == 3  # skipped (final), still diverged: the same exit code as the sweep's
    assert "skipped: already diverged" in capsys.readouterr().out


def test_a_job_running_in_another_process_is_not_run_twice(tiny, run_env, capsys):
    argv = ["-m", *tiny(), "seed=0,1", "sweep_name=busy"]
    busy_dir = run_env / "sweeps" / "busy" / job_dirname([*tiny(), "seed=1"], ["output_root", "logger"])
    with job_lock(busy_dir):  # as another mbn-train process running that job would
        assert main(argv) == 0  # running elsewhere is not a failure of this command
    out = capsys.readouterr().out
    assert "sweep done: 1 completed, 0 failed, 1 busy, 0 skipped (of 2 jobs)" in out
    assert f"mbn-train:   busy: {busy_dir} - running in another process" in out
    assert not (busy_dir / "results.json").exists()


def test_dry_run_of_a_single_run_trains_nothing(tiny, run_env, capsys):
    assert main([*tiny(), "dry_run=true"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"mbn-train: would start {run_env / 'runs'}/") and line.endswith(" (new)")
    assert "dry_run" not in line.split("/")[-1]  # control keys never name a dir
    assert not list(run_env.rglob("results.json")) and not list(run_env.rglob("*.ckpt"))


def test_the_sweep_pre_check_expands_jobs_exactly_as_hydras_basic_sweeper():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference, in the test only
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from mbn.cli.sweep import BASIC_SWEEPER, sweep_overrides

    params = {"norm": "bn,mbn", "data.batch_size": "2,8,32"}
    task = ["seed=0,1", "data.batch_size=4,8", "epochs=3", "norm=gn"]
    config = OmegaConf.create({"hydra": {"sweeper": {"params": params}, "overrides": {"task": task},
                                         "runtime": {"choices": {"hydra/sweeper": BASIC_SWEEPER}}}})
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    (expected,) = BasicSweeper.split_arguments(parsed, None)
    assert sweep_overrides(config) == expected and len(expected) == 4
    # Another sweeper proposes its own jobs: no job list up front.
    config.hydra.runtime.choices["hydra/sweeper"] = "optuna"
    assert sweep_overrides(config) is None
