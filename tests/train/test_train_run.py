"""``mbn.train`` without Hydra: a RunSpec in, a trained run and its results.json out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from mbn.nn import schedule
from mbn.results import read_results, total_wall_time, write_results
from mbn.train import LoggerSpec, RunSpec, TrainerSpec, train
from mbn.train.spec import FakeDataSpec, FakeSource, MomentumBatchNormSpec, ResNetSpec, TensorBoardSpec
from mbn.train.run import build_trainer
from numerics import TEST_THREADS


def fake_spec(output_dir: Path, **changes) -> RunSpec:
    spec = RunSpec(
        data=FakeDataSpec(source=FakeSource(num_train=64, num_test=32, image_size=8),
                      batch_size=8, eval_batch_size=32, augment=True, crop_padding=1),
        model=ResNetSpec("resnet18", width=4),
        norm=MomentumBatchNormSpec(schedule="iteration"),
        trainer=TrainerSpec(num_threads=TEST_THREADS),
        epochs=2,
        output_dir=output_dir,
        run_name="unit",
        config={"note": "hand-made"},
        config_hash="0123456789abcdef",
    )
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


class SeeResultsAtEpochStart(Callback):
    """Reads results.json when epoch 2 starts: the run must already report epoch 1."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.seen: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self.seen = read_results(self.output_dir)


def test_train_without_hydra_records_every_epoch(tmp_path):
    spec = fake_spec(tmp_path / "run")
    probe = SeeResultsAtEpochStart(spec.output_dir)
    results = train(spec, callbacks=[probe])
    on_disk = read_results(spec.output_dir)
    assert on_disk.pop("schema_version") == 2 and on_disk == results
    assert probe.seen["status"] == "running" and probe.seen["epochs_completed"] == 1
    assert results["status"] == "completed" and results["config_hash"] == "0123456789abcdef"
    assert results["config"] == {"note": "hand-made"}
    # Per-iteration MBN schedule: the logged lam is the value at the epoch's last batch.
    batches = 64 // 8
    expected = [schedule.lam(epoch + (batches - 1) / batches, 2, 8, 32) for epoch in (1, 2)]
    assert [row["lam"] for row in results["history"]] == pytest.approx(expected)
    assert 0 < expected[0] < expected[1] <= 0.75
    # lr at each epoch start: the first decay (30% of 16 steps) falls inside epoch 1.
    assert [row["lr"] for row in results["history"]] == pytest.approx([0.1 * 8 / 64, 0.1 * 8 / 64 / 10])


class CtrlC(Callback):
    """Ctrl-C at the third batch of epoch 2."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise KeyboardInterrupt


def test_keyboard_interrupt_is_recorded_as_interrupted(tmp_path):
    spec = fake_spec(tmp_path / "run")
    results = train(spec, callbacks=[CtrlC()])
    assert results["status"] == "interrupted" and results["epochs_completed"] == 1
    assert results["error"] == "KeyboardInterrupt"
    assert (spec.output_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_resumed_run_records_each_attempts_seconds_and_their_total(tmp_path):
    spec = fake_spec(tmp_path / "run")
    first = train(spec, callbacks=[CtrlC()])
    (attempt,) = first["attempts"]
    assert first["status"] == "interrupted" and attempt["wall_time_s"] == first["wall_time_s"] > 0
    # As records were written before attempts carried their seconds: only the record's own.
    write_results(spec.output_dir, {**first, "attempts": [{k: v for k, v in attempt.items() if k != "wall_time_s"}]})
    resumed = train(spec)
    assert resumed["status"] == "completed" and [a["status"] for a in resumed["attempts"]] == ["interrupted", "completed"]
    earlier, last = resumed["attempts"]
    assert earlier["wall_time_s"] == first["wall_time_s"]  # kept from the record it replaced
    assert last["wall_time_s"] == resumed["wall_time_s"] > 0
    assert total_wall_time(resumed) == round(first["wall_time_s"] + resumed["wall_time_s"], 3)


def test_tensorboard_logger_writes_events(tmp_path):
    spec = fake_spec(tmp_path / "run", epochs=1, loggers=LoggerSpec(selected={"tensorboard": TensorBoardSpec()}))
    assert train(spec)["status"] == "completed"
    assert list((spec.output_dir / "tensorboard").glob("version_0/events.out.tfevents.*"))


@pytest.mark.parametrize("setting, expected", [(None, False), (True, True), (False, False)])
def test_progress_bar_only_on_terminals_unless_forced(tmp_path, setting, expected):
    # pytest's stdout is not a terminal, so "auto" (None) means no bar.
    spec = fake_spec(tmp_path / "run", trainer=TrainerSpec(progress_bar=setting))
    trainer = build_trainer(spec, [], [])
    assert (trainer.progress_bar_callback is not None) is expected


class RecordLam(Callback):
    """The lam each MBN layer trains with, read in every training step (after the batch-start hooks)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from mbn.nn import mbn_layers

        lams = {layer.lam for layer in mbn_layers(pl_module)}
        assert len(lams) == 1
        self.seen.append((trainer.current_epoch, batch_idx, lams.pop()))


@pytest.mark.parametrize("total_epochs", [None, 5])
def test_the_module_drives_the_mbn_schedule_under_a_plain_trainer(tmp_path, total_epochs):
    """Any Trainer trains MBN right: no callback of this package is needed for the schedule."""
    import pytorch_lightning as pl

    from mbn.train.datamodule import ImageDataModule
    from mbn.train.run import build_seeded_model
    from mbn.train.module import ClassificationModule

    spec = fake_spec(tmp_path / "run", epochs=3)
    datamodule = ImageDataModule(spec.data, seed=spec.seed)
    datamodule.setup("fit")
    model = build_seeded_model(spec, datamodule.num_classes, datamodule.in_channels)
    module = ClassificationModule(model, spec.optim, 8, datamodule.num_classes, total_epochs=total_epochs)
    probe = RecordLam()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[probe], accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    batches = trainer.num_training_batches
    T = total_epochs or 3
    expected = [schedule.lam(epoch + 1 + i / batches, T, 8, 32) for epoch in range(3) for i in range(batches)]
    assert [lam for _, _, lam in probe.seen] == expected  # the same float function of the same inputs
    assert max(expected) > 0.3


def image_bytes(split) -> list[bytes]:
    """Each image's bytes (the fake images are all different): a split compared as a set of images."""
    return [image.numpy().tobytes() for image in split.images]


def spec_with_validation_split(output_dir: Path, val_subset: int = 20, **data) -> RunSpec:
    """fake_spec on 80 training images (8 per class) with ``val_subset`` of them held out."""
    spec = fake_spec(output_dir, epochs=3)
    spec.data = FakeDataSpec(source=FakeSource(num_train=80, num_test=32, image_size=8), batch_size=8, eval_batch_size=32,
                             augment=True, crop_padding=1, val_subset=val_subset, **data)
    return spec


def test_val_subset_holds_out_stratified_training_images_and_train_subset_takes_the_rest():
    from mbn.data import load_dataset
    from mbn.train.datamodule import ImageDataModule

    spec = spec_with_validation_split(Path("unused")).data
    full = set(image_bytes(load_dataset(spec.name, **spec.source_options).train))
    assert len(full) == 80
    datamodule = ImageDataModule(spec)
    train, val = datamodule.load().train, datamodule.val_split
    assert datamodule.eval_splits == ("val", "test") and len(datamodule.val_dataloader()) == 2
    assert len(val) == 20 and torch.bincount(val.labels, minlength=10).tolist() == [2] * 10
    held_out = set(image_bytes(val))
    assert len(held_out) == 20 and held_out.isdisjoint(image_bytes(train)) and held_out | set(image_bytes(train)) == full

    subset = ImageDataModule(dataclasses.replace(spec, train_subset=30))
    subset_train = set(image_bytes(subset.load().train))
    assert len(subset_train) == 30 and subset_train.isdisjoint(held_out) and set(image_bytes(subset.val_split)) == held_out

    without = ImageDataModule(dataclasses.replace(spec, val_subset=None))
    assert without.eval_splits == ("test",) and len(without.load().train) == 80 and without.val_split is None


def test_a_run_with_a_validation_split_records_it_as_val_and_the_test_split_as_test(tmp_path):
    """The recorded accuracies are those of the held-out images and of the test images: the last
    epoch's are recounted from ``last.ckpt`` on the datamodule's loaders (the same computation on the
    same machine, so the counts are equal), and ``best.ckpt`` is the epoch of the best val_acc1."""
    from mbn.train.datamodule import ImageDataModule
    from mbn.train.run import build_seeded_model

    spec = spec_with_validation_split(tmp_path / "run")
    results = train(spec)
    assert results["status"] == "completed"
    rows, metrics = results["history"], results["metrics"]
    for row in rows:
        for column, samples in (("val_acc1", 20), ("val_acc5", 20), ("test_acc1", 32), ("test_acc5", 32)):
            assert row[column] * samples == pytest.approx(round(row[column] * samples)), column
        assert row["val_loss"] > 0 and row["test_loss"] > 0
    best = max(rows, key=lambda row: row["val_acc1"])
    assert (metrics["best_epoch"], metrics["best_val_acc1"], metrics["best_epoch_test_acc1"]) == (
        best["epoch"], best["val_acc1"], best["test_acc1"])
    assert (metrics["final_val_acc1"], metrics["final_test_acc1"]) == (rows[-1]["val_acc1"], rows[-1]["test_acc1"])
    checkpoints = spec.output_dir / "checkpoints"
    best_checkpoint = torch.load(checkpoints / "best.ckpt", weights_only=True)
    assert best_checkpoint["epoch"] == metrics["best_epoch"] - 1
    assert any("'monitor': 'val/acc1'" in key for key in best_checkpoint["callbacks"])

    datamodule = ImageDataModule(spec.data, seed=spec.seed)
    model = build_seeded_model(spec, datamodule.num_classes, datamodule.in_channels)
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    model.eval()
    with torch.no_grad():
        for split, loader in zip(datamodule.eval_splits, datamodule.val_dataloader()):
            correct = samples = 0
            for x, y in loader:
                correct += int((model(x).argmax(1) == y).sum())
                samples += len(y)
            assert (samples, correct) == ({"val": 20, "test": 32}[split], round(rows[-1][f"{split}_acc1"] * samples)), split


@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stack-of-2"])
def test_brn_ramps_in_epochs_are_the_runs_steps_per_epoch_times_their_epochs(tmp_path, stacked):
    """norm=brn_epochs: the layers get warmup and ramps of as many steps as the Trainer runs per epoch."""
    import pytorch_lightning as pl

    from mbn.nn import BatchRenorm
    from mbn.train.run import build_datamodule, build_module
    from mbn.train.spec import BatchRenormSpec

    norm = BatchRenormSpec(warmup_epochs=1, r_max_ramp_epochs=2.5, d_max_ramp_epochs=0.5)
    # 60 of 64 images with val_subset=4, batch 8: 7 steps (the held-out images and the cut last batch are not steps).
    spec = fake_spec(tmp_path / "run", norm=norm, data=dataclasses.replace(fake_spec(tmp_path).data, val_subset=4))
    specs = [spec, dataclasses.replace(spec, seed=1)] if stacked else [spec]
    datamodule = build_datamodule(specs)
    module = build_module(specs, datamodule)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    steps = trainer.num_training_batches
    assert steps == 7
    layers = [m for m in module.modules() if isinstance(m, BatchRenorm)]
    assert layers
    for layer in layers:
        assert (layer.warmup_steps, layer.r_max_ramp_steps, layer.d_max_ramp_steps) == (steps, round(2.5 * steps), round(0.5 * steps))


def test_cbn_burn_in_in_epochs_is_the_runs_steps_per_epoch_times_its_epochs(tmp_path):
    """norm=cbn: the layers' burn-in is its epochs times the steps the Trainer runs per epoch (7 here,
    as the BRN test above counts them)."""
    from mbn.nn import CrossIterationBatchNorm
    from mbn.train.run import build_datamodule, build_module
    from mbn.train.spec import CrossIterationBatchNormSpec

    spec = fake_spec(tmp_path / "run", norm=CrossIterationBatchNormSpec(burnin_epochs=1.5),
                     data=dataclasses.replace(fake_spec(tmp_path).data, val_subset=4))
    datamodule = build_datamodule([spec])
    module = build_module([spec], datamodule)
    assert datamodule.steps_per_epoch(1) == 7
    layers = [m for m in module.modules() if isinstance(m, CrossIterationBatchNorm)]
    assert layers and {layer.burnin_steps for layer in layers} == {round(1.5 * 7)}
