"""Whose history MBN's momentum statistics carry under DDP (``trainer.mbn_history``), and their checkpoints.

DDP copies rank 0's buffers to every device at each forward (``broadcast_buffers=True``). For the
running statistics (BN's, BRN's and MBN's: what evaluation and the saved model use) that is what
this project wants: one set, evaluated on every device, saved in the checkpoint. For MBN's momentum
statistics ``M``/``Phi`` it is not what the paper describes: they normalize each device's training
batches, and their history should be that device's own batches, as the batch statistics they mix in
are. So by default (``per_device``) DDP's broadcast skips them (``_ddp_params_and_buffers_to_ignore``,
which DistributedDataParallel reads when it wraps the module) and every device's ``M``/``Phi``
average its own batches; ``rank0`` keeps DDP's plain behaviour (rank 0's history on every device,
each device adding only its current batch).

A checkpoint holds one state_dict (rank 0's), so with per-device history the other ranks' ``M``/``Phi``
are gathered into the checkpoint too and each rank restores its own on resume: a resumed run
continues every device's history exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from mbn.nn import MomentumBatchNorm
from mbn.train.spec import MBN_HISTORIES
from mbn.utils.library_internals import ignore_in_ddp

log = logging.getLogger("mbn.train")

# MBN's momentum statistics (M, Phi, whether they are initialized): the buffers each device keeps.
MOMENTUM_BUFFERS = ("momentum_mean", "momentum_var", "momentum_initialized")
# Checkpoint key of every rank's momentum statistics: {buffer name: tensor stacked over ranks}.
CHECKPOINT_KEY = "mbn_per_device_momentum_stats"


def momentum_buffer_names(module: nn.Module) -> list[str]:
    """Full names (relative to ``module``) of every MBN layer's momentum-statistics buffers."""
    return [f"{name}.{buffer}" if name else buffer
            for name, layer in module.named_modules() if isinstance(layer, MomentumBatchNorm)
            for buffer in MOMENTUM_BUFFERS]


def keep_momentum_stats_per_device(module: nn.Module) -> list[str]:
    """Make DistributedDataParallel leave ``module``'s MBN momentum statistics out of its buffer
    broadcast (call before wrapping it). Returns the buffer names."""
    names = momentum_buffer_names(module)
    ignore_in_ddp(module, names)
    return names


class PerDeviceMomentumStats(Callback):
    """``trainer.mbn_history=per_device`` under DDP: MBN's ``M``/``Phi`` stay per device, and every
    rank's are checkpointed and restored (see the module docstring). Does nothing on one device,
    with ``rank0``, or without MBN layers.

    Args:
        history: one of :data:`MBN_HISTORIES`.
    """

    def __init__(self, history: str) -> None:
        if history not in MBN_HISTORIES:
            raise ValueError(f"history must be one of {MBN_HISTORIES}, got {history!r}")
        self.history = history
        self.names: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before the strategy wraps the module in DistributedDataParallel.
        if self.history == "per_device" and trainer.world_size > 1:
            self.names = keep_momentum_stats_per_device(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every rank dumps the checkpoint (only rank 0 writes it), so all of them take part in the gather.
        if not self.names:
            return
        buffers = dict(pl_module.named_buffers())
        mine = torch.cat([buffers[name].detach().reshape(-1).to(torch.float64) for name in self.names])
        everyone = trainer.strategy.all_gather(mine).cpu()  # world_size x (all buffers, flattened)
        stacked, start = {}, 0
        for name in self.names:
            buffer = buffers[name]
            stop = start + buffer.numel()
            stacked[name] = everyone[:, start:stop].reshape(-1, *buffer.shape).to(buffer.dtype)
            start = stop
        checkpoint[CHECKPOINT_KEY] = stacked

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # After the state_dict (rank 0's) is loaded: each rank puts back its own statistics.
        stacked = checkpoint.get(CHECKPOINT_KEY)
        if not self.names or stacked is None:
            return
        if set(stacked) != set(self.names) or any(t.shape[0] != trainer.world_size for t in stacked.values()):
            log.warning("checkpoint's per-device MBN statistics do not match this run's layers or %d devices; "
                        "every device continues from rank 0's", trainer.world_size)
            return
        buffers = dict(pl_module.named_buffers())
        with torch.no_grad():
            for name in self.names:
                buffers[name].copy_(stacked[name][trainer.global_rank])
        for layer in pl_module.modules():
            if isinstance(layer, MomentumBatchNorm):
                layer._sync_with_buffers()  # the Python mirror of momentum_initialized
