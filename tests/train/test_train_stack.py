"""``train_stack``: K seeds as one stacked model, each member recorded and checkpointed as its single run.

Error model (tests/numerics.py): a float32 stack computes each member's numbers in another order
than its single run (grouped convolutions, a batched linear layer, a vectorized loss; the thread
count changes a convolution's order too), and 16 SGD steps carry the last-bit differences on. Losses
and weights are compared per tensor, norm-wise, within ``GROWTH * steps * eps(float32)``; accuracies
as counts of samples, at most ``FLIPS`` apart per epoch (a sample whose top two logits lie within
the rounding difference may flip). A run compared with itself on this machine (an interrupted stack
resumed against the uninterrupted one, the members next to a frozen one) must be bit-identical.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch._dynamo.utils import counters

from mbn.models import member_state_dict
from mbn.results import read_results, summarize_history
from mbn.train import FailAtEpoch, LoggerSpec, TrainerSpec, train, train_stack
from mbn.train.spec import ResNetSpec, TensorBoardSpec, VGGSpec
from test_train_run import fake_spec
from numerics import TEST_THREADS, assert_close_normwise, assert_histories_close

SEEDS = (0, 1, 2)
STEPS = 2 * 64 // 8  # fake_spec: 2 epochs of 64 samples in batches of 8
# Measured at most 1e2 units of steps * eps(float32) (1.9e-4 of a weight tensor) with 1 thread, 28
# with 2. 1e3 (1.9e-3) leaves a margin of 10, and fails a stack whose members 0 and 1 got each
# other's batches (train_loss off by 1.3e-2) or whose member 1 saw one image of member 0 (8e-2).
GROWTH = 1e3
FLIPS = 2  # of 64 training and 32 validation samples per epoch


def member_spec(root: Path, seed: int, **changes):
    return fake_spec(root / f"seed{seed}", seed=seed, run_name=f"seed{seed}", config_hash=f"hash-seed{seed}", **changes)


def weights(output_dir: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    return torch.load(Path(output_dir) / "checkpoints" / name, weights_only=True)["state_dict"]


def assert_histories_match(history, expected):
    """The same training in another order: the error model above."""
    assert_histories_close(history, expected, steps_per_epoch=STEPS // 2, growth=GROWTH, train_samples=64,
                           test_samples=32, allowed_flips=FLIPS)


def assert_histories_equal(history, expected):
    """The same run on this machine: every number but the wall-clock time equal."""
    assert [{k: v for k, v in row.items() if k != "time_s"} for row in history] == [
        {k: v for k, v in row.items() if k != "time_s"} for row in expected]


def assert_weights_match(found, expected, steps=STEPS):
    assert_close_normwise(found, expected, dtype=torch.float32, steps=steps, growth=GROWTH, what="weights")


def assert_weights_equal(found, expected):
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Seeds 0, 1, 2 trained alone and as one stack (2 epochs each)."""
    root = tmp_path_factory.mktemp("stack")
    singles = {seed: train(member_spec(root / "single", seed)) for seed in SEEDS}
    stacked = train_stack([member_spec(root / "stack", seed) for seed in SEEDS])
    return root, singles, stacked


@pytest.mark.numerics
def test_each_member_trains_and_is_recorded_as_its_single_run(runs):
    root, singles, stacked = runs
    for seed, results in zip(SEEDS, stacked):
        member_dir = root / "stack" / f"seed{seed}"
        assert read_results(member_dir)["status"] == results["status"] == "completed"
        assert results["config_hash"] == f"hash-seed{seed}" and len(results["attempts"]) == 1
        assert_histories_match(results["history"], singles[seed]["history"])
        assert results["metrics"] == summarize_history(results["history"])["metrics"]
        assert_weights_match(weights(member_dir), weights(root / "single" / f"seed{seed}"))
        best_epoch = results["metrics"]["best_epoch"]
        assert torch.load(member_dir / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == best_epoch - 1
        if best_epoch == singles[seed]["metrics"]["best_epoch"]:  # a flipped validation sample may pick the other
            assert_weights_match(weights(member_dir, "best.ckpt"), weights(root / "single" / f"seed{seed}", "best.ckpt"))
        checkpoint = torch.load(member_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["mbn_config_hash"] == f"hash-seed{seed}" and checkpoint["epoch"] == 1
        rows = (member_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
        assert "test/acc1" in rows[0] and len(rows) == 3  # header + one row per epoch
    # The seeds are different runs: other initializations and batches.
    losses = {results["history"][0]["train_loss"] for results in stacked}
    assert len(losses) == len(SEEDS)
    first, second = weights(root / "stack" / "seed0"), weights(root / "stack" / "seed1")
    assert not torch.allclose(first["model.fc.weight"], second["model.fc.weight"])


@pytest.mark.numerics
def test_a_member_of_an_interrupted_stack_resumes_alone_as_its_single_run(runs, tmp_path):
    root, singles, _ = runs
    specs = [member_spec(tmp_path, seed) for seed in SEEDS]
    interrupted = train_stack(specs, callbacks=[FailAtEpoch(2)])
    assert [results["status"] for results in interrupted] == ["failed"] * len(SEEDS)
    assert all(results["epochs_completed"] == 1 for results in interrupted)
    resumed = train(specs[1])
    assert resumed["status"] == "completed" and len(resumed["attempts"]) == 2
    assert_histories_match(resumed["history"], singles[1]["history"])
    assert_weights_match(weights(specs[1].output_dir), weights(root / "single" / "seed1"))


def test_an_interrupted_stack_resumes_to_the_uninterrupted_stacks_weights(runs, tmp_path):
    root, _, stacked = runs
    specs = [member_spec(tmp_path, seed) for seed in SEEDS]
    train_stack(specs, callbacks=[FailAtEpoch(2)])
    resumed = train_stack(specs)
    for seed, results, uninterrupted in zip(SEEDS, resumed, stacked):
        assert results["status"] == "completed" and len(results["attempts"]) == 2
        assert results["attempts"][-1]["resumed_from"] == str(tmp_path / f"seed{seed}" / "checkpoints" / "last.ckpt")
        assert_histories_equal(results["history"], uninterrupted["history"])
        assert_weights_equal(weights(tmp_path / f"seed{seed}"), weights(root / "stack" / f"seed{seed}"))


# An lr and weight-decay grid of one seed (issue: stacked hyperparameter search), with a step schedule
# whose decay falls inside the run, so the schedule's lr per epoch is compared too. (GROWTH was measured at
# lr 0.1: a member at a higher lr amplifies the rounding differences more, so the grid stays at or below it.)
GRID = ((0.1, 1e-4), (0.05, 5e-4))


def grid_specs(root: Path) -> list:
    from mbn.train import OptimSpec

    return [fake_spec(root / f"lr{lr}_wd{wd}", seed=0, run_name=f"lr{lr}", config_hash=f"hash-lr{lr}",
                      optim=OptimSpec(base_lr=lr, weight_decay=wd, milestones=(0.5,)))
            for lr, wd in GRID]


@pytest.mark.numerics
def test_members_with_their_own_lr_and_weight_decay_train_resume_and_resume_alone_as_their_single_runs(tmp_path):
    specs = grid_specs(tmp_path / "stack")
    singles = [train(spec) for spec in grid_specs(tmp_path / "single")]
    stacked = train_stack(specs)
    for spec, results, single in zip(specs, stacked, singles):
        assert results["status"] == "completed" and results["lr"] == single["lr"]
        assert_histories_match(results["history"], single["history"])  # (lr per epoch included)
        assert results["history"][1]["lr"] == pytest.approx(single["history"][1]["lr"], rel=1e-15)
        assert_weights_match(weights(spec.output_dir), weights(tmp_path / "single" / spec.output_dir.name))
    lrs = [results["history"][0]["lr"] for results in stacked]
    assert lrs == pytest.approx([lr * 8 / 64 for lr, _ in GRID])  # linear scaling of each member's own base lr
    # Interrupted after epoch 1: the stack resumes to the uninterrupted stack, bit for bit.
    interrupted = grid_specs(tmp_path / "interrupted")
    assert [r["status"] for r in train_stack(interrupted, callbacks=[FailAtEpoch(2)])] == ["failed"] * len(GRID)
    for results, uninterrupted in zip(train_stack(interrupted), stacked):
        assert results["status"] == "completed" and len(results["attempts"]) == 2
        assert_histories_equal(results["history"], uninterrupted["history"])
    for spec, stack_spec in zip(interrupted, specs):
        assert_weights_equal(weights(spec.output_dir), weights(stack_spec.output_dir))
    # A member of an interrupted stack resumes alone at its own lr and weight decay, as its single run.
    alone = grid_specs(tmp_path / "alone")
    train_stack(alone, callbacks=[FailAtEpoch(2)])
    resumed = train(alone[1])
    assert resumed["status"] == "completed" and len(resumed["attempts"]) == 2
    assert_histories_match(resumed["history"], singles[1]["history"])
    assert resumed["history"][1]["lr"] == pytest.approx(singles[1]["history"][1]["lr"], rel=1e-15)
    assert_weights_match(weights(alone[1].output_dir), weights(tmp_path / "single" / alone[1].output_dir.name))


def test_runs_that_differ_in_another_optimizer_setting_are_refused(tmp_path):
    from mbn.train import OptimSpec

    specs = [member_spec(tmp_path, 0), member_spec(tmp_path, 1, optim=OptimSpec(momentum=0.5))]
    with pytest.raises(ValueError, match="run 1 has another optim than run 0"):
        train_stack(specs)


def test_members_at_different_epochs_are_refused(runs, tmp_path):
    root, _, _ = runs
    specs = [member_spec(tmp_path, seed) for seed in SEEDS[:2]]
    train_stack(specs, callbacks=[FailAtEpoch(2)])  # both at epoch 1
    shutil.rmtree(specs[0].output_dir)
    shutil.copytree(root / "stack" / "seed0", specs[0].output_dir)  # the completed member: epoch 2
    with pytest.raises(ValueError, match="different epochs: member 0 at epoch 1 .*member 1 at epoch 0"):
        train_stack(specs)
    assert read_results(specs[0].output_dir)["status"] == "completed"  # refused before any record is written
    fresh = member_spec(tmp_path, 2)
    with pytest.raises(ValueError, match="different epochs:.*seed2 has no checkpoint"):
        train_stack([specs[1], fresh])


def test_runs_that_differ_in_more_than_their_seed_are_refused(tmp_path):
    with pytest.raises(ValueError, match="run 1 has another model than run 0"):
        train_stack([member_spec(tmp_path, 0), member_spec(tmp_path, 1, model=ResNetSpec("resnet18", width=8))])
    with pytest.raises(ValueError, match="its own output_dir"):
        train_stack([member_spec(tmp_path, 0), fake_spec(tmp_path / "seed0", seed=1)])


def test_each_member_writes_its_own_tensorboard_events(tmp_path):
    specs = [member_spec(tmp_path, seed, epochs=1, loggers=LoggerSpec(selected={"tensorboard": TensorBoardSpec()})) for seed in SEEDS[:2]]
    for spec, results in zip(specs, train_stack(specs)):
        assert results["status"] == "completed"
        events = EventAccumulator(str(spec.output_dir / "tensorboard" / "version_0"))
        events.Reload()
        assert [event.value for event in events.Scalars("test/acc1")] == pytest.approx([results["history"][0]["test_acc1"]])


@pytest.mark.numerics
def test_stacked_members_report_the_shared_validation_split_as_their_single_runs(tmp_path):
    """Members share the held-out images (the split depends on ``subset_seed`` only): each member's
    val_* and test_* columns match its single run's (the error model above, 16 validation samples)."""
    data = dataclasses.replace(member_spec(tmp_path, 0).data, val_subset=16)  # 48 training images left
    singles = [train(member_spec(tmp_path / "single", seed, data=data)) for seed in SEEDS[:2]]
    stacked = train_stack([member_spec(tmp_path / "stack", seed, data=data) for seed in SEEDS[:2]])
    for seed, single, member in zip(SEEDS, singles, stacked):
        assert member["status"] == single["status"] == "completed"
        assert all(row["val_acc1"] is not None and row["test_acc1"] is not None for row in member["history"])
        assert_histories_close(member["history"], single["history"], steps_per_epoch=48 // 8, growth=GROWTH,
                               train_samples=48, test_samples=32, val_samples=16, allowed_flips=FLIPS)
        best = torch.load(tmp_path / "stack" / f"seed{seed}" / "checkpoints" / "best.ckpt", weights_only=True)
        assert any("'monitor': 'val/acc1'" in key for key in best["callbacks"])  # picked on the validation split
        assert best["epoch"] == member["metrics"]["best_epoch"] - 1


class PoisonMember(Callback):
    """Member 1 diverges in epoch 2: NaN weights in its first convolution before batch 2.

    Records member 1's state two batches after it is frozen and when training ends.
    """

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 1:
            with torch.no_grad():
                pl_module.model.body.stem[0].weight[4:8].fill_(float("nan"))  # member 1's block (width 4)
        if trainer.current_epoch == 1 and batch_idx == 4:
            self.states.append(member_state_dict(pl_module.model, 1))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.states.append(member_state_dict(pl_module.model, 1))


def test_a_diverged_member_is_frozen_and_recorded_while_the_others_complete(runs, tmp_path):
    _, _, stacked = runs
    poison = PoisonMember()
    trainer = TrainerSpec(num_threads=TEST_THREADS, check_finite_every_n_steps=1)
    specs = [member_spec(tmp_path, seed, trainer=trainer) for seed in SEEDS]
    results = train_stack(specs, callbacks=[poison])
    assert [r["status"] for r in results] == ["completed", "diverged", "completed"]
    diverged = read_results(specs[1].output_dir)
    assert diverged["status"] == "diverged" and "non-finite training loss (nan) in epoch 2 by step 2 of 8" in diverged["error"]
    # Its record and checkpoint stop at the last epoch it finished, as its single run's would.
    assert_histories_equal(diverged["history"], stacked[1]["history"][:1])
    assert torch.load(specs[1].output_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    # Frozen: nothing of it moved from two batches after the freeze to the end of training.
    during, end = poison.states
    assert torch.isnan(end["stem.0.weight"]).all()
    for key, value in during.items():
        assert torch.equal(end[key], value) or torch.allclose(end[key], value, rtol=0, atol=0, equal_nan=True), key
    # The others trained on exactly as in the stack without a diverged member.
    for k in (0, 2):
        assert_histories_equal(results[k]["history"], stacked[k]["history"])


@pytest.mark.torch_compile
@pytest.mark.numerics
def test_a_compiled_stack_trains_as_the_eager_one(tmp_path, monkeypatch):
    # aot_eager traces forward and backward as inductor does, without its minutes of C++ compiling.
    # VGG-11 for one epoch: the same compiles as ResNet-18 (MBN's lam = 0 on the first batch, then a
    # new lam every step, the evaluation forward) at a fraction of the tracing time (174 s -> ~25 s).
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile_module(self, backend="aot_eager", **kwargs))

    def members(root: Path, compile_model: bool):
        trainer = TrainerSpec(num_threads=TEST_THREADS, compile=compile_model)
        return [member_spec(root, seed, model=VGGSpec("vgg11", width=4), epochs=1, trainer=trainer) for seed in SEEDS[:2]]

    eager = train_stack(members(tmp_path / "eager", False))
    torch._dynamo.reset()  # no compiled code of other tests in, none of this test out
    counters.clear()  # reset() keeps dynamo's counters
    try:
        results = train_stack(members(tmp_path / "compiled", True))
        assert counters["stats"]["unique_graphs"] >= 1  # it did run compiled
    finally:
        torch._dynamo.reset()
    for seed, found, expected in zip(SEEDS, results, eager):
        assert found["status"] == expected["status"] == "completed"
        assert [row["lam"] for row in found["history"]] != [0.0]  # MBN's momentum was on
        assert_histories_close(found["history"], expected["history"], steps_per_epoch=STEPS // 2, growth=GROWTH,
                               train_samples=64, test_samples=32, allowed_flips=FLIPS)
        assert_weights_match(weights(tmp_path / "compiled" / f"seed{seed}"), weights(tmp_path / "eager" / f"seed{seed}"),
                             steps=STEPS // 2)
