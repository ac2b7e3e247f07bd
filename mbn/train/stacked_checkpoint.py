"""Each member of a stacked run checkpoints as its single run: split on save, merged on resume.

A member's ``last.ckpt`` / ``best.ckpt`` hold exactly what its single run's would: the member
model's ``state_dict`` (``model.*`` keys), its SGD momentum buffers, the shared lr scheduler and
loop positions, its own :class:`~mbn.train.callbacks.EpochRecorder` history and checkpoint
callbacks' state under the single run's state keys, and its config hash. So ``train(spec)`` of
that member resumes from it, and a stack of members at the same epoch resumes from theirs
(:func:`merge_member_checkpoints`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from mbn.models import load_member_optimizer_state_dict, load_member_state_dict, member_optimizer_state_dict, member_state_dict
from mbn.train.callbacks import EpochRecorder
from mbn.train.run_dir import CHECKPOINT_HASH_KEY
from mbn.train.optim import build_optimizer
from mbn.train.stacked_module import StackedClassificationModule, member_metric

# ClassificationModule keeps the network as ``self.model``: its state_dict keys start so.
MODEL_PREFIX = "model."
# The parts of a checkpoint that are a member's own; every other entry is shared by the stack.
MEMBER_ENTRIES = ("state_dict", "optimizer_states", "callbacks", CHECKPOINT_HASH_KEY)


class MemberEpochRecorder(EpochRecorder):
    """Member ``k``'s :class:`EpochRecorder`: its metrics, no rows once it has diverged.

    ``single_state_key`` is the state key of a single run's recorder, under which the member's
    checkpoints keep its history.

    Args:
        member: member index.
        **kwargs: as for :class:`EpochRecorder` (``metric_prefix`` is set here).
    """

    def __init__(self, member: int, **kwargs: Any) -> None:
        super().__init__(metric_prefix=member_metric(member, ""), **kwargs)
        self.member = member
        self.single_state_key = EpochRecorder().state_key

    @property
    def state_key(self) -> str:
        return self._generate_state_key(member=self.member)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A diverged single run records no row for the epoch it diverged in, nor any later.
        if self.member not in pl_module.diverged:
            super().on_train_epoch_end(trainer, pl_module)


class MemberCheckpoint(ModelCheckpoint):
    """A checkpoint callback of member ``k``: monitors its metrics, saves its share of the stack.

    Args:
        member: member index.
        split: turns the stack's full checkpoint into member ``k``'s (see :func:`split_member_checkpoint`).
        **kwargs: as for ``ModelCheckpoint``.
    """

    def __init__(self, member: int, split: Callable[[dict[str, Any]], dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.member = member
        self.split = split
        # What a single run's callback of these settings is called in its checkpoints.
        self.single_state_key = ModelCheckpoint(**kwargs).state_key

    @property
    def state_key(self) -> str:
        return f"{super().state_key}[member {self.member}]"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A diverged member keeps the checkpoints of its last finished epoch, as its single run does.
        if self.member not in pl_module.diverged:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.member not in pl_module.diverged:
            super().on_validation_end(trainer, pl_module)

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        # The member's metrics under the single run's names (val/acc1), which ``monitor`` names.
        candidates = super()._monitor_candidates(trainer)
        prefix = member_metric(self.member, "")
        candidates.update({key[len(prefix):]: value for key, value in list(candidates.items()) if key.startswith(prefix)})
        return candidates

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # As ModelCheckpoint._save_checkpoint, with the member's share in place of the whole stack.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(self.split(checkpoint), filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def member_callbacks_state(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """A member's callbacks' states under the state keys of the single run's callbacks.

    Args:
        callbacks: member ``k``'s :class:`MemberEpochRecorder` and :class:`MemberCheckpoint` callbacks.
    """
    return {callback.single_state_key: callback.state_dict() for callback in callbacks}


def split_member_checkpoint(
    checkpoint: Mapping[str, Any], module: StackedClassificationModule, k: int, callbacks: Sequence[Callback], config_hash: str
) -> dict[str, Any]:
    """Member ``k``'s single-run checkpoint out of the stack's full checkpoint.

    Args:
        checkpoint: what the stack's trainer dumps (``dump_checkpoint``).
        module: the stack's module (its model and optimizer hold the current state).
        k: member index.
        callbacks: member ``k``'s stateful callbacks (see :func:`member_callbacks_state`).
        config_hash: member ``k``'s config hash.
    """
    member = {key: value for key, value in checkpoint.items() if key not in MEMBER_ENTRIES}
    member["state_dict"] = {MODEL_PREFIX + key: value for key, value in member_state_dict(module.model, k).items()}
    member["optimizer_states"] = [member_optimizer_state_dict(module.trainer.optimizers[0], module.model, k)]
    member["callbacks"] = member_callbacks_state(callbacks)
    member[CHECKPOINT_HASH_KEY] = config_hash
    return member


def check_same_position(checkpoints: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` unless the members' checkpoints stand at the same epoch and step.

    Args:
        checkpoints: member k's loaded checkpoint at index k.
    """
    positions = [(checkpoint.get("epoch"), checkpoint.get("global_step")) for checkpoint in checkpoints]
    if len(set(positions)) > 1:
        listed = ", ".join(f"member {k} at epoch {epoch} (step {step})" for k, (epoch, step) in enumerate(positions))
        raise ValueError(f"cannot resume a stack of members at different epochs: {listed}; stack members that stand at the same epoch")


def merge_member_checkpoints(
    checkpoints: Sequence[Mapping[str, Any]], module: StackedClassificationModule, callbacks: Sequence[Sequence[Callback]]
) -> dict[str, Any]:
    """The stack's checkpoint out of its members' single-run checkpoints (all at the same step).

    Loads each member's weights into ``module`` (the checkpoint holds the same weights).

    Args:
        checkpoints: member k's loaded checkpoint at index k.
        module: the stack's module, not yet trained.
        callbacks: member k's stateful callbacks at index k.

    Raises:
        ValueError: members at different epochs or steps (a stack trains them in lockstep).
    """
    check_same_position(checkpoints)
    merged = {key: value for key, value in checkpoints[0].items() if key not in MEMBER_ENTRIES}
    # A scratch SGD of the module's parameter layout collects the members' momentum buffers.
    optimizer, _ = build_optimizer(module.model, module.optim, module.global_batch_size, total_steps=1, steps_per_epoch=1)
    for k, checkpoint in enumerate(checkpoints):
        state_dict = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint["state_dict"].items()}
        load_member_state_dict(module.model, k, state_dict)
        load_member_optimizer_state_dict(optimizer, module.model, k, checkpoint["optimizer_states"][0])
    merged["state_dict"] = module.state_dict()
    # The members share the lr and every group setting; the resumed values are in their param groups.
    merged["optimizer_states"] = [{"state": optimizer.state_dict()["state"], "param_groups": checkpoints[0]["optimizer_states"][0]["param_groups"]}]
    merged["callbacks"] = {
        callback.state_key: checkpoint["callbacks"][callback.single_state_key]
        for checkpoint, member_callbacks in zip(checkpoints, callbacks)
        for callback in member_callbacks
        if callback.single_state_key in checkpoint.get("callbacks", {})
    }
    return merged
