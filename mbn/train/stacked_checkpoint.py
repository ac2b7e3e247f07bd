"""Each member of a stacked run checkpoints as its single run: split on save, merged on resume.

A member's ``last.ckpt`` / ``best.ckpt`` hold exactly what its single run's would: the member
model's ``state_dict`` (``model.*`` keys), its SGD momentum buffers and param groups (its own lr and
weight decay), the lr scheduler (at its own lr) and the loop positions, its own :class:`~mbn.train.callbacks.EpochRecorder` history and checkpoint
callbacks' state under the single run's state keys, and its config hash. So ``train(spec)`` of
that member resumes from it, and a stack of members at the same epoch resumes from theirs
(:func:`merge_member_checkpoints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from mbn.models import load_member_optimizer_state_dict, load_member_state_dict, member_optimizer_state_dict, member_state_dict
from mbn.models.stacked_optim import MEMBER_LR_SCALE, MEMBER_WEIGHT_DECAY
from mbn.train.run_dir import BEST_CHECKPOINT, CHECKPOINT_HASH_KEY, LAST_CHECKPOINT
from mbn.train.optim import build_optimizer
from mbn.train.stacked_module import StackedClassificationModule, member_metric

# ClassificationModule keeps the network as ``self.model``: its state_dict keys start so.
MODEL_PREFIX = "model."
# The parts of a checkpoint that are a member's own; every other entry is shared by the stack.
MEMBER_ENTRIES = ("state_dict", "optimizer_states", "callbacks", CHECKPOINT_HASH_KEY)


def checkpoint_settings(dirpath: str | Path, monitor: str) -> list[dict[str, Any]]:
    """A run's checkpoint callbacks' ``ModelCheckpoint`` arguments: ``last.ckpt`` after every epoch,
    then ``best.ckpt`` by ``monitor``.

    Args:
        dirpath: the run's checkpoint dir.
        monitor: the metric ``best.ckpt`` maximizes (:attr:`mbn.train.spec.DataSpec.selection_metric`:
            ``val/acc1`` with a validation split, else ``test/acc1``).
    """
    # last.ckpt after every epoch (what a rerun resumes from; Lightning's save_last=True only
    # rewrites it in epochs that also save a top-k checkpoint), best.ckpt by the monitored accuracy.
    return [
        dict(dirpath=dirpath, filename=Path(LAST_CHECKPOINT).stem, monitor=None, save_top_k=1, enable_version_counter=False),
        dict(dirpath=dirpath, filename=Path(BEST_CHECKPOINT).stem, monitor=monitor, mode="max", save_top_k=1,
             enable_version_counter=False),
    ]


class MemberCheckpoint(ModelCheckpoint):
    """A checkpoint callback of member ``k`` of a stack: monitors its metrics (``member<k>/val/acc1``
    for ``val/acc1``); the job's :class:`~mbn.train.checkpoint_io.MemberCheckpointIO` writes only its
    share of the stack into its dir.

    Args:
        member: member index.
        **kwargs: as for ``ModelCheckpoint``, with the single run's metric names.
    """

    def __init__(self, member: int, **kwargs: Any) -> None:
        self.single_monitor = kwargs.get("monitor")
        # What a single run's callback of these settings is called in its checkpoints.
        self.single_state_key = ModelCheckpoint(**kwargs).state_key
        monitor = member_metric(member, self.single_monitor) if self.single_monitor else None
        super().__init__(**{**kwargs, "monitor": monitor})
        self.member = member

    @property
    def state_key(self) -> str:
        return f"{self.single_state_key}[member {self.member}]"

    def state_dict(self) -> dict[str, Any]:
        # As the single run's callback records it (under the metric name it monitors).
        return {**super().state_dict(), "monitor": self.single_monitor}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A diverged member keeps the checkpoints of its last finished epoch, as its single run does.
        if self.member not in pl_module.diverged:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.member not in pl_module.diverged:
            super().on_validation_end(trainer, pl_module)


def member_checkpoints(dirpath: str | Path, member: int, monitor: str) -> list[MemberCheckpoint]:
    """Member ``member``'s checkpoint callbacks: its single run's (:func:`checkpoint_settings`) on its metrics.

    Args:
        dirpath: the member's checkpoint dir.
        member: member index.
        monitor: the single run's metric ``best.ckpt`` maximizes.
    """
    return [MemberCheckpoint(member, **kwargs) for kwargs in checkpoint_settings(dirpath, monitor)]


def member_callbacks_state(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """A member's callbacks' states under the state keys of the single run's callbacks.

    Args:
        callbacks: member ``k``'s :class:`~mbn.train.callbacks.EpochRecorder` and :class:`MemberCheckpoint` callbacks.
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
    optimizer = module.trainer.optimizers[0]
    member["optimizer_states"] = [member_optimizer_state_dict(optimizer, module.model, k)]
    if "lr_schedulers" in member and any(MEMBER_LR_SCALE in group for group in optimizer.param_groups):
        # The schedule's base and last lr of member k's single run (its lr, not member 0's).
        scales = [group[MEMBER_LR_SCALE][k] for group in optimizer.param_groups]
        member["lr_schedulers"] = [
            {**state, **{key: [lr * scale for lr, scale in zip(state[key], scales)] for key in ("base_lrs", "_last_lr") if key in state}}
            for state in member["lr_schedulers"]
        ]
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
    optimizer, _ = build_optimizer(module.model, module.optim, module.global_batch_size, total_steps=1, steps_per_epoch=1,
                                   member_specs=module.member_optims)
    for k, checkpoint in enumerate(checkpoints):
        state_dict = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint["state_dict"].items()}
        load_member_state_dict(module.model, k, state_dict)
        load_member_optimizer_state_dict(optimizer, module.model, k, checkpoint["optimizer_states"][0])
    merged["state_dict"] = module.state_dict()
    # Member 0's lr and schedule are the stack's (the others' are scaled from them, see MemberSGD):
    # its param groups as resumed, with the stack's own per-member entries.
    groups = [
        {**saved, **{key: value for key, value in built.items() if key in (MEMBER_LR_SCALE, MEMBER_WEIGHT_DECAY, "weight_decay")}}
        for saved, built in zip(checkpoints[0]["optimizer_states"][0]["param_groups"], optimizer.state_dict()["param_groups"])
    ]
    merged["optimizer_states"] = [{"state": optimizer.state_dict()["state"], "param_groups": groups}]
    merged["callbacks"] = {
        callback.state_key: checkpoint["callbacks"][callback.single_state_key]
        for checkpoint, member_callbacks in zip(checkpoints, callbacks)
        for callback in member_callbacks
        if callback.single_state_key in checkpoint.get("callbacks", {})
    }
    return merged
