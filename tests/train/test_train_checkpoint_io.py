"""Checkpoints: written atomically (a full disk never leaves a truncated last.ckpt), loaded weights-only,
rewritten every epoch; and the strategy may never swap normalization layers."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from mbn.nn import norm_layer
from mbn.models import build_model
from mbn.results import read_results
from mbn.train import RunSpec, TrainerSpec, train
from mbn.train.spec import FakeDataSpec, FakeSource, MomentumBatchNormSpec, ResNetSpec
from mbn.train.callbacks import NormLayerGuard, norm_layer_counts
from mbn.train.checkpoint_io import AtomicCheckpointIO, checkpoint_refusal_message

STEPS_PER_EPOCH = 64 // 8


def spec_in(output_dir: Path, epochs: int = 2) -> RunSpec:
    return RunSpec(
        data=FakeDataSpec(source=FakeSource(num_train=64, num_test=32, image_size=8), batch_size=8,
                      eval_batch_size=32, augment=False),
        model=ResNetSpec("resnet18", width=4),
        norm=MomentumBatchNormSpec(),
        trainer=TrainerSpec(num_threads=1),
        epochs=epochs,
        output_dir=output_dir,
        run_name="ckpt",
        config={"test": "checkpoint io"},
        config_hash="c0ffee0000000000",
    )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_full_disk_while_saving_keeps_the_previous_checkpoint_and_the_rerun_matches(tmp_path, monkeypatch):
    reference = train(spec_in(tmp_path / "reference"))
    assert reference["status"] == "completed"

    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 3:  # epoch 1: last.ckpt and best.ckpt; epoch 2's last.ckpt hits a full disk
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\x00" * 1000)  # part of the file reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    spec = spec_in(tmp_path / "run")
    failed = train(spec)
    monkeypatch.undo()
    assert failed["status"] == "failed" and failed["epochs_completed"] == 2
    last = spec.output_dir / "checkpoints" / "last.ckpt"
    assert failed["error"] == f"OSError: [Errno 28] No space left on device while saving checkpoint {last}"
    assert load(last)["global_step"] == STEPS_PER_EPOCH  # epoch 1's complete checkpoint, untouched
    assert [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert json.loads((spec.output_dir / "results.json").read_text())["status"] == "failed"

    resumed = train(spec)  # the rerun resumes from epoch 1's checkpoint
    assert resumed["status"] == "completed" and resumed["resumed_from"] == str(last)
    assert [a["status"] for a in resumed["attempts"]] == ["failed", "completed"]
    for key in ("train_loss", "test_acc1", "test_loss", "lam"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in reference["history"]], key
    expected = load(tmp_path / "reference" / "checkpoints" / "last.ckpt")["state_dict"]
    actual = load(last)["state_dict"]
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


class Marker:
    """A pickled object that would create a file if unpickled with code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_with_pickled_code_is_refused_not_executed(tmp_path):
    spec = spec_in(tmp_path / "run")
    assert train(spec)["status"] == "completed"
    last = spec.output_dir / "checkpoints" / "last.ckpt"
    marker = tmp_path / "code-ran"
    checkpoint = load(last)
    checkpoint["callbacks"]["poison"] = Marker(marker)
    torch.save(checkpoint, last)
    (spec.output_dir / "results.json").write_text(json.dumps({**read_results(spec.output_dir), "status": "interrupted"}))

    results = train(spec)
    assert results["status"] == "failed"
    assert results["error"].startswith(f"ValueError: cannot load checkpoint {last} with weights_only=True: UnpicklingError")
    assert not marker.exists()


def test_checkpoint_io_saves_atomically_and_loads_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"w": torch.ones(2), "epoch": 3}, path)
    assert io.load_checkpoint(path)["epoch"] == 3
    with pytest.raises(TypeError, match="does not take storage_options"):
        io.save_checkpoint({}, path, storage_options={"x": 1})
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    path.write_bytes(path.read_bytes()[:100])  # truncated by something other than mbn
    with pytest.raises(ValueError, match="cannot load checkpoint .* with weights_only=True"):
        io.load_checkpoint(path)


class Settings:
    """A custom class: weights-only loading refuses it, whatever it holds."""

    def __init__(self) -> None:
        self.lr = 0.1


# Torch's own advice (retry with weights-only loading off, allow-list the global) that the message never passes on.
TORCH_ADVICE = ("weights_only=False", "weights_only` set to `False`", "WeightsUnpickler", "add_safe_globals", "\x1b[")


def assert_refused_in_mbn_words(error: pytest.ExceptionInfo, path: Path, why: str) -> None:
    message = str(error.value)
    assert type(error.value) is ValueError and "\n" not in message
    assert message == f"cannot load checkpoint {path} with weights_only=True: {why}; remove it to restart the run from the beginning"
    assert not [advice for advice in TORCH_ADVICE if advice in message]
    assert error.value.__cause__ is not None  # torch's error, kept for debugging
    assert message == checkpoint_refusal_message(path, error.value.__cause__)  # what the CLI's dry run can say


def test_a_checkpoint_holding_a_custom_object_is_refused_for_safety_in_this_projects_words(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "settings": Settings()}, path)
    with pytest.raises(ValueError) as error:
        AtomicCheckpointIO().load_checkpoint(path)
    assert_refused_in_mbn_words(
        error, path,
        f"UnpicklingError: refused for safety: it references {Settings.__module__}.Settings, which is not a tensor or "
        "plain container and could run code when loaded (a crafted file, or one saved by other code)",
    )


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_corrupt_checkpoint_is_refused_as_corrupt_in_this_projects_words(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}, "epoch": 3}, path)
    content = {"truncated": path.read_bytes()[:-200], "empty": b"", "garbage": b"not a checkpoint at all"}[damage]
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        AtomicCheckpointIO().load_checkpoint(path)
    exception_type = type(error.value.__cause__).__name__
    assert_refused_in_mbn_words(
        error, path,
        f"{exception_type}: refused as corrupt: it is not a complete checkpoint file (truncated, damaged or not a checkpoint)",
    )


def test_a_checkpoint_the_disk_could_not_read_is_not_called_corrupt(tmp_path):
    path = tmp_path / "last.ckpt"
    message = checkpoint_refusal_message(path, OSError(errno.EIO, "Input/output error"))
    assert message == (
        f"cannot load checkpoint {path}: OSError: Input/output error; fix the file's permissions or the disk and "
        "rerun (the checkpoint was not read, so keep it)"
    )


class ValAccuracyFalls(Callback):
    """Report a falling test/acc1 (what best.ckpt monitors without a validation split), so that the last
    epoch never has the best score."""

    def on_validation_end(self, trainer, pl_module) -> None:
        trainer.callback_metrics["test/acc1"] = torch.tensor(1.0 - 0.1 * trainer.current_epoch)


def test_last_checkpoint_is_rewritten_every_epoch_even_without_a_new_best(tmp_path):
    spec = spec_in(tmp_path / "run", epochs=3)
    assert train(spec, callbacks=[ValAccuracyFalls()])["status"] == "completed"
    checkpoints = spec.output_dir / "checkpoints"
    assert load(checkpoints / "last.ckpt")["global_step"] == 3 * STEPS_PER_EPOCH
    assert load(checkpoints / "best.ckpt")["global_step"] == STEPS_PER_EPOCH


@pytest.mark.parametrize("norm", ["mbn", "brn", "bn", "gn"])
def test_norm_layer_guard_fails_if_layers_are_swapped(norm):
    options = {"num_groups": 2} if norm == "gn" else {}
    model = build_model("resnet18", num_classes=3, norm_layer=norm_layer(norm, **options), width=4)
    guard = NormLayerGuard(model)
    assert sum(guard.expected.values()) > 0

    class Strategy:
        def __init__(self, model):
            self.model = model

    class Trainer:
        def __init__(self, model):
            self.strategy = Strategy(model)

    guard.on_fit_start(Trainer(model), None)  # unchanged: passes
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if norm == "bn":  # what sync_batchnorm=True would do
        assert "SyncBatchNorm" in norm_layer_counts(converted)
        with pytest.raises(RuntimeError, match="normalization layers changed"):
            guard.on_fit_start(Trainer(converted), None)
    else:  # MBN, BRN, GN are never converted
        guard.on_fit_start(Trainer(converted), None)
