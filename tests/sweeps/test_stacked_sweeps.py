"""``mbn-train -m ... stack=K``: jobs that differ only in seed train as one stacked model in one process.

Real Hydra multiruns through ``mbn-train`` (basic and joblib launchers), tiny fake-data jobs, float32.

Error model (tests/numerics.py): a grouped convolution sums in another order than K dense ones (and
the thread count changes a convolution's order too), and SGD on these tiny networks carries the
last-bit differences on: the losses of a stacked seed and its unstacked run agree norm-wise within
``GROWTH * steps * eps(float32)`` over the run's 16 steps, and its accuracies to ``FLIPS`` samples
per epoch (a sample whose top two logits lie within the rounding difference may flip: one of 64
did on another machine). The seeds differ by 1e-2 of the loss and more.
"""

from __future__ import annotations

import pytest
from cli_runner import mbn_train as main
from sweep_helpers import job_dir, sweep_runs
from numerics import assert_histories_close
from wandb_records import read_finished_wandb_records, wandb_history

# Measured at most 3.6e2 units of steps * eps(float32) (7e-4 of the losses, width 8) with 1 and 2
# threads (at width 4 one seed has a near-degenerate BN channel that turns it into 5e-2). 3e3
# (5.7e-3) leaves a margin of 8, and fails a stacked sweep whose members 0 and 1 got each other's
# batches (train_loss off by 5e-2) or whose member 1 saw one image of member 0 (4e-2).
GROWTH = 3e3
FLIPS = 2


def histories_close(a: dict, b: dict) -> None:
    """``a`` trained as ``b`` (tiny runs: 64 training and 32 validation samples, batches of 8)."""
    assert_histories_close(a["history"], b["history"], steps_per_epoch=8, growth=GROWTH, train_samples=64,
                           test_samples=32, allowed_flips=FLIPS)


def by_seed(sweep_dir) -> dict[int, dict]:
    return {record["seed"]: record for record in sweep_runs(sweep_dir).values()}


@pytest.mark.numerics
def test_a_stacked_sweep_records_each_seed_as_its_unstacked_run(tiny, run_env, capsys):
    base = ["-m", *tiny(epochs=2, model__width=8), "seed=0,1,2"]
    assert main([*base, "sweep_name=single"]) == 0
    capsys.readouterr()
    assert main([*base, "stack=3", "sweep_name=stacked", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "mbn-train: would stack seeds 0, 1, 2 in one process" in out
    assert "mbn-train: dry run of 3 jobs in 1 stacked pack: 3 start; nothing was run" in out

    assert main([*base, "stack=3", "sweep_name=stacked"]) == 0
    assert "mbn-train: sweep done: 3 completed, 0 failed, 0 skipped (of 3 jobs)" in capsys.readouterr().out
    single, stacked = by_seed(run_env / "sweeps" / "single"), by_seed(run_env / "sweeps" / "stacked")
    assert sorted(stacked) == [0, 1, 2]
    for seed in (0, 1, 2):
        # Same dir name, same config hash, same history as the run trained alone.
        assert stacked[seed]["run_name"] == single[seed]["run_name"]
        assert stacked[seed]["config_hash"] == single[seed]["config_hash"]
        assert stacked[seed]["status"] == "completed"
        histories_close(stacked[seed], single[seed])
    losses = sorted(record["history"][-1]["train_loss"] for record in stacked.values())
    assert min(b - a for a, b in zip(losses, losses[1:])) > 1e-2 * losses[0]  # the seeds differ, by far more
    # The launcher ran one job for the pack: only the first seed's dir has Hydra's job files.
    launched = [seed for seed in (0, 1, 2) if (job_dir(run_env / "sweeps" / "stacked", f"seed={seed}") / ".hydra").is_dir()]
    assert launched == [0]

    # Rerun: nothing trains again; a fourth seed in the same pack trains alone, the others are skipped.
    assert main([*base, "stack=3", "sweep_name=stacked"]) == 0
    assert "sweep done: 0 completed, 0 failed, 3 skipped (of 3 jobs)" in capsys.readouterr().out
    assert main(["-m", *tiny(epochs=2, model__width=8), "seed=0,1,2,3", "stack=4", "sweep_name=stacked"]) == 0
    assert "sweep done: 1 completed, 0 failed, 3 skipped (of 4 jobs)" in capsys.readouterr().out
    again = by_seed(run_env / "sweeps" / "stacked")
    assert [len(again[seed]["attempts"]) for seed in (0, 1, 2, 3)] == [1, 1, 1, 1]


@pytest.mark.numerics
def test_a_swept_learning_rate_grid_trains_as_one_stack_and_each_member_is_its_unstacked_run(tiny, run_env, capsys):
    # The lr grid of one seed (the fair curve study's tuning): packed along optim.base_lr, seed fixed.
    base = ["-m", *tiny(epochs=2, model__width=8), "optim.base_lr=0.1,0.05"]
    assert main([*base, "stack=2", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "mbn-train: would stack optim.base_lr values 0.1, 0.05 in one process" in out
    assert "mbn-train: dry run of 2 jobs in 1 stacked pack: 2 start; nothing was run" in out
    assert main([*base, "stack=2", "sweep_name=grid"]) == 0
    assert "sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in capsys.readouterr().out
    stacked = {record["config"]["optim"]["base_lr"]: record for record in sweep_runs(run_env / "sweeps" / "grid").values()}
    assert sorted(stacked) == [0.05, 0.1]
    assert len({record["attempts"][0]["pid"] for record in stacked.values()}) == 1  # one process, one model
    assert [stacked[lr]["history"][0]["lr"] for lr in (0.1, 0.05)] == pytest.approx([0.1 * 8 / 64, 0.05 * 8 / 64])
    # The same sweep unstacked finds every member's run (same dir, same config hash): nothing trains again.
    assert main([*base, "sweep_name=grid"]) == 0
    assert "sweep done: 0 completed, 0 failed, 2 skipped (of 2 jobs)" in capsys.readouterr().out
    # Trained alone, each lr's run is its member's (the error model above).
    assert main([*base, "sweep_name=alone"]) == 0
    alone = {record["config"]["optim"]["base_lr"]: record for record in sweep_runs(run_env / "sweeps" / "alone").values()}
    for lr in (0.1, 0.05):
        assert alone[lr]["config_hash"] == stacked[lr]["config_hash"] and alone[lr]["run_name"] == stacked[lr]["run_name"]
        histories_close(stacked[lr], alone[lr])


@pytest.mark.numerics
def test_members_that_stopped_at_different_epochs_each_resume_exactly(tiny, run_env, capsys):
    base = ["-m", *tiny(epochs=3, model__width=8), "seed=0,1"]
    assert main([*base, "sweep_name=reference"]) == 0
    # Seed 0 stops when its epoch 2 starts (epoch 1 checkpointed); seed 1 has not started.
    assert main(["-m", *tiny(epochs=3, model__width=8), "seed=0", "debug.fail_at_epoch=2", "sweep_name=mixed"]) == 1
    assert main([*base, "stack=2", "sweep_name=mixed"]) == 0
    assert "sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in capsys.readouterr().out
    reference, mixed = by_seed(run_env / "sweeps" / "reference"), by_seed(run_env / "sweeps" / "mixed")
    assert [a["status"] for a in mixed[0]["attempts"]] == ["failed", "completed"]
    assert mixed[0]["attempts"][1]["resumed_from"].endswith("last.ckpt")
    for seed in (0, 1):
        histories_close(mixed[seed], reference[seed])


def test_stacked_packs_are_one_job_each_under_the_joblib_launcher(tiny, run_env, capsys):
    argv = ["-m", *tiny(), "seed=0,1,2,3", "stack=2", "sweep_name=par", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    assert main(argv) == 0
    assert "sweep done: 4 completed, 0 failed, 0 skipped (of 4 jobs)" in capsys.readouterr().out
    sweep_dir = run_env / "sweeps" / "par"
    runs = by_seed(sweep_dir)
    assert sorted(runs) == [0, 1, 2, 3] and all(r["status"] == "completed" for r in runs.values())
    launched = [seed for seed in runs if (job_dir(sweep_dir, f"seed={seed}") / ".hydra").is_dir()]
    assert sorted(launched) == [0, 2]


def test_every_member_of_a_stack_has_its_own_wandb_run(tiny, run_env):
    assert main(["-m", *tiny(epochs=2, logger="[csv,wandb]"), "seed=0,1", "stack=2", "sweep_name=wbstack"]) == 0
    sweep_dir = run_env / "sweeps" / "wbstack"
    for seed, record in by_seed(sweep_dir).items():
        run_dir = job_dir(sweep_dir, f"seed={seed}")
        (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        records = read_finished_wandb_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_group == "wbstack" and run.display_name == run_dir.name
        logged = wandb_history(records)
        assert logged["test/acc1"] == pytest.approx([row["test_acc1"] for row in record["history"]])
        assert logged["train/loss"] == pytest.approx([row["train_loss"] for row in record["history"]], rel=1e-6)
        (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
        assert exit_record.exit_code == 0


@pytest.mark.parametrize("extra, message", [
    (["stack=2", "trainer=ddp_cpu"], "stack: stacked runs train on one device"),
    (["stack=0"], "stack: must be a positive integer or auto, got 0"),
])
def test_what_stacks_cannot_do_is_refused_at_start_up(extra, message, tiny, run_env, capsys):
    assert main(["-m", *[o for o in tiny() if not o.startswith("logger")], "seed=0,1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(run_env.rglob("results.json"))
