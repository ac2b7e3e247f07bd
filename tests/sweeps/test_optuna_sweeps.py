"""Hydra's Optuna sweeper (``hydra/sweeper=optuna``): each trial is a normal job, a failed one is a
failed Optuna trial, the sweep's summary and exit code count every job, and a rerun skips the
trials that completed.

Real Hydra multiruns through ``mbn-train``'s ``main()`` (in-process launcher), tiny runs. The
Optuna study is read back through the sweeper's own ``custom_search_space`` hook, which Optuna's
sweeper calls with each trial it asks for (:func:`keep_study`).
"""

from __future__ import annotations

import optuna
import pytest
from sweep_helpers import sweep_runs

from cli_runner import mbn_train as main

# The studies the sweeps of a test created, newest last (filled by keep_study).
STUDIES: list[optuna.Study] = []


def keep_study(config: object, trial: optuna.trial.Trial) -> None:
    """``hydra.sweeper.custom_search_space`` hook: keep the study the trial belongs to."""
    if not STUDIES or STUDIES[-1] is not trial.study:
        STUDIES.append(trial.study)


@pytest.fixture
def optuna_sweep(tiny):
    """``optuna_sweep(*more) -> argv``: a tiny Optuna sweep of the base lr (log scale), the study kept."""
    STUDIES.clear()
    base = ["-m", "hydra/sweeper=optuna", *tiny(), "data.val_subset=20", "optim.base_lr=tag(log, interval(0.05, 2))",
            f"hydra.sweeper.custom_search_space={__name__}.keep_study"]
    return lambda *more: [*base, *more]


def test_trials_are_jobs_a_failed_one_fails_in_optuna_and_a_rerun_skips_completed_ones(optuna_sweep, run_env, capsys):
    # Half the trials fail when their only epoch starts; with the sampler's fixed seed (0, set by
    # mbn-train) the same 3 trials come back in the rerun.
    argv = optuna_sweep("debug.fail_at_epoch=choice(1,2)", "hydra.sweeper.n_trials=3", "sweep_name=tune")
    assert main(argv) == 1
    out = capsys.readouterr().out
    sweep_dir = run_env / "sweeps" / "tune"
    runs = sweep_runs(sweep_dir)
    assert len(runs) == 3
    statuses = sorted(record["status"] for record in runs.values())
    assert "completed" in statuses and "failed" in statuses, statuses
    assert f"mbn-train: sweep done: {statuses.count('completed')} completed, {statuses.count('failed')} failed, 0 skipped (of 3 jobs)" in out
    (study,) = STUDIES
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # final_val_acc1, the default objective
    by_lr = {record["config"]["optim"]["base_lr"]: record for record in runs.values()}
    for trial in study.trials:
        record = by_lr[trial.params["optim.base_lr"]]
        assert 0.05 <= record["config"]["optim"]["base_lr"] <= 2
        if record["status"] == "completed":
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == record["metrics"]["final_val_acc1"]
        else:
            assert trial.state == optuna.trial.TrialState.FAIL and trial.value is None
    # The best job is the first trial (in the order Optuna proposed them) with the best value: 20
    # validation images give accuracies in steps of 0.05, so trials may tie.
    best_value = max(trial.value for trial in study.trials if trial.value is not None)
    best_trial = next(trial for trial in study.trials if trial.value == best_value)
    best_dir, best = next((name, r) for name, r in runs.items() if r["config"]["optim"]["base_lr"] == best_trial.params["optim.base_lr"])
    best_lines = [line for line in out.splitlines() if line.startswith("mbn-train: best job: ")]
    assert best_lines == [f"mbn-train: best job: final_val_acc1 {best['metrics']['final_val_acc1']:.4f} (maximized over "
                          f"{statuses.count('completed')} of 3 jobs): optim.base_lr={best['config']['optim']['base_lr']!r} "
                          f"debug.fail_at_epoch=2 in {sweep_dir / best_dir}"]
    assert not [path for path in sweep_dir.iterdir() if path.name.startswith(".mbn-sweep-")], "the ledger is removed"

    # The same command: the completed trials are skipped (and give Optuna their recorded values),
    # the failed one runs again (and fails again).
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"mbn-train: sweep done: 0 completed, {statuses.count('failed')} failed, {statuses.count('completed')} skipped (of 3 jobs)" in out
    assert [line for line in out.splitlines() if line.startswith("mbn-train: best job: ")] == best_lines
    again = sweep_runs(sweep_dir)
    assert again.keys() == runs.keys()
    for name, record in again.items():
        expected = ["completed"] if runs[name]["status"] == "completed" else ["failed", "failed"]
        assert [attempt["status"] for attempt in record["attempts"]] == expected, name
    assert [trial.params for trial in STUDIES[1].trials] == [trial.params for trial in study.trials]
    assert [trial.state for trial in STUDIES[1].trials] == [trial.state for trial in study.trials]


def test_a_sweep_whose_trials_all_fail_exits_nonzero_with_its_summary(optuna_sweep, run_env, capsys):
    # No trial completes: Optuna's sweeper has no best trial and raises; mbn-train still summarizes.
    argv = optuna_sweep("debug.fail_at_epoch=1", "hydra.sweeper.n_trials=2", "objective=final_val_loss", "sweep_name=fail")
    assert main(argv) == 1
    out, err = capsys.readouterr()
    runs = sweep_runs(run_env / "sweeps" / "fail")
    assert sorted(record["status"] for record in runs.values()) == ["failed", "failed"]
    assert "mbn-train: sweep done: 0 completed, 2 failed, 0 skipped (of 2 jobs)" in out
    assert "mbn-train: best job: none (no job completed with a final_val_loss)" in out
    assert "mbn-train: the sweeper stopped: ValueError: No trials are completed yet." in err
    assert "Traceback" not in out + err
    (study,) = STUDIES
    assert study.direction == optuna.study.StudyDirection.MINIMIZE  # a loss
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.FAIL] * 2


def test_shared_values_direction_and_dry_run_are_checked_before_any_trial(optuna_sweep, tiny, run_env, capsys):
    for more, message in [
        (["objective=best_epoch"], "mbn-train: invalid config: objective: must be a metric of results.json, one of "
                                   "final_test_acc1, final_test_acc5, final_test_loss"),
        (["data.val_subset=null"], "mbn-train: invalid config: objective: final_val_acc1 is measured on the validation "
                                   "split, which this sweep does not hold out: set data.val_subset=N"),
        (["data.batch_size=0"], "mbn-train: invalid config: data.batch_size: must be a positive integer, got 0 (every job; sweep not started)"),
        (["hydra.sweeper.direction=minimize"], "mbn-train: invalid config: hydra.sweeper.direction: minimize contradicts "
                                               "objective=final_val_acc1, which is maximized"),
    ]:
        assert main(optuna_sweep(*more)) == 2, more
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(optuna_sweep("hydra.sweeper.n_trials=6", "dry_run=true")) == 0
    out = capsys.readouterr().out
    assert f"mbn-train: would start the jobs hydra/sweeper=optuna proposes (6 trials) in {run_env / 'sweeps' / 'default'}" in out
    assert not list(run_env.rglob("results.json")) and STUDIES == []
    # A swept value is checked when its job starts: the job is a failed trial, counted as an invalid config.
    assert main(optuna_sweep("optim.momentum=choice(1.5)", "hydra.sweeper.n_trials=1")) == 2
    out, err = capsys.readouterr()
    assert "mbn-train: invalid config: optim.momentum: must be a number in [0, 1), got 1.5" in err
    assert "mbn-train: sweep done: 0 completed, 0 failed, 0 skipped, 1 config_error (of 1 jobs)" in out
    assert [trial.state for trial in STUDIES[-1].trials] == [optuna.trial.TrialState.FAIL]
    assert not list(run_env.rglob("results.json"))
    # A single run checks the objective the same way.
    assert main([*tiny(), "objective=val_acc1"]) == 2
    assert "mbn-train: invalid config: objective: must be a metric of results.json" in capsys.readouterr().err


def test_a_trial_whose_process_died_is_counted_from_its_results_json(optuna_sweep, run_env, capsys):
    from mbn.cli.sweep import unrecorded_outcomes
    from mbn.results import write_results

    assert main(optuna_sweep("hydra.sweeper.n_trials=1", "sweep_name=killed")) == 0
    capsys.readouterr()
    sweep_dir = run_env / "sweeps" / "killed"
    ((name, record),) = sweep_runs(sweep_dir).items()
    invocation = record["attempts"][-1]["invocation"]
    # What a job killed mid-run leaves: a running record of this command's attempt, no ledger entry.
    write_results(sweep_dir / name, {**record, "status": "running"})
    (outcome,) = unrecorded_outcomes(sweep_dir, invocation, recorded=set())
    assert (outcome.status, outcome.output_dir) == ("failed", sweep_dir / name)
    assert "ended without a final status" in outcome.error
    assert unrecorded_outcomes(sweep_dir, invocation, recorded={(sweep_dir / name).resolve()}) == []
    assert unrecorded_outcomes(sweep_dir, "another-command", recorded=set()) == []
