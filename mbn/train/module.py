"""LightningModule for image classification with the paper's optimizer recipe."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from mbn.nn import MomentumBatchNorm, mbn_layers, set_progress
from mbn.train.optim import build_optimizer
from mbn.train.spec import OptimSpec


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run stops as ``diverged``."""


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training with epoch-level metrics and no per-step host synchronization.

    Training loss and accuracy are summed in device tensors and read once per epoch
    (:meth:`train_epoch_metrics`); nothing is logged per step. The summed loss is checked for
    NaN/inf every ``check_finite_every_n_steps`` steps and at the end of each epoch (the only host
    syncs in the loop), raising :class:`DivergedError`.

    Args:
        model: the network (logits output).
        optim: optimizer and schedule settings.
        global_batch_size: samples per optimizer step over all devices (linear lr scaling).
        num_classes: number of classes (top-5 accuracy is reported only when it exceeds 5).
        check_finite_every_n_steps: divergence check interval in steps.
        total_epochs: planned epochs T of the MBN schedule; None = the Trainer's ``max_epochs``.
        eval_splits: the names of the evaluation dataloaders, in order (``("val", "test")`` or
            ``("test",)``, :attr:`mbn.train.spec.DataSpec.eval_splits`): split ``s`` is logged as
            ``s/loss``, ``s/acc1`` and ``s/acc5``.

    The module drives the MBN schedule itself: at every training batch start it sets the fractional
    1-based epoch ``current_epoch + 1 + batch_idx / num_training_batches`` on its (cached)
    :class:`~mbn.nn.MomentumBatchNorm` layers, so MBN follows the paper's schedule under any
    Trainer, with or without this package's callbacks (which only log lam and tau).
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimSpec,
        global_batch_size: int,
        num_classes: int,
        check_finite_every_n_steps: int = 25,
        total_epochs: int | None = None,
        eval_splits: tuple[str, ...] = ("test",),
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.global_batch_size = global_batch_size
        self.num_classes = num_classes
        self.check_finite_every_n_steps = max(1, check_finite_every_n_steps)
        self.total_epochs = total_epochs
        self.eval_splits = tuple(eval_splits)
        # Each member's optimizer settings where a stack's members differ in lr or weight decay.
        self.member_optims: list[OptimSpec] | None = None
        self._mbn_layers: list[MomentumBatchNorm] = mbn_layers(model)
        # [batch-mean loss sum, correct top-1, samples, batches]; on-device accumulators, reset each epoch.
        self._train_sums: torch.Tensor | None = None
        # Per evaluation split: [loss sum (per sample), correct top-1, correct top-5, samples].
        self._val_sums: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # --- training -------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._train_sums = torch.zeros(4, device=self.device, dtype=torch.float64)

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        if self._mbn_layers:
            total_epochs = self.total_epochs or self.trainer.max_epochs
            epoch = self.current_epoch + 1 + batch_idx / max(1, self.trainer.num_training_batches)
            set_progress(self._mbn_layers, epoch, total_epochs)

    def schedule_values(self) -> dict[str, float]:
        """The MBN schedule's current ``lam`` and ``tau`` (shared by every layer; empty without MBN)."""
        if not self._mbn_layers:
            return {}
        return {"lam": float(self._mbn_layers[0].lam), "tau": float(self._mbn_layers[0].tau)}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        sums = self._train_sums
        sums[0] += loss.detach()
        sums[1] += (logits.detach().argmax(1) == y).sum()
        sums[2] += y.shape[0]
        sums[3] += 1
        if self.finite_check_due(batch_idx):
            if not torch.isfinite(sums[0]):
                raise DivergedError(
                    f"non-finite training loss ({sums[0].item()}) in epoch {self.current_epoch + 1} "
                    f"by step {batch_idx + 1} of {self.trainer.num_training_batches}"
                )
        return loss

    def finite_check_due(self, batch_idx: int) -> bool:
        """Whether the loss is checked for NaN/inf after batch ``batch_idx`` (every n steps and at epoch end).

        Args:
            batch_idx: the batch's index in the epoch.
        """
        step = batch_idx + 1
        return step % self.check_finite_every_n_steps == 0 or step == self.trainer.num_training_batches

    def train_epoch_metrics(self) -> dict[str, float]:
        """Mean training loss and top-1 accuracy of the current epoch, over all devices (one sync)."""
        if self._train_sums is None:
            return {}
        sums = self.trainer.strategy.reduce(self._train_sums.clone(), reduce_op="sum")
        loss_sum, correct, samples, batches = sums.tolist()
        if not batches:
            return {}
        return {"train/loss": loss_sum / batches, "train/acc1": correct / samples}

    # --- validation -----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(len(self.eval_splits), 4, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self.model(x)
        sums = self._val_sums[dataloader_idx]
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = topk == y.unsqueeze(1)
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += y.shape[0]

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums.clone(), reduce_op="sum")
        metrics = {}
        for split, (loss_sum, correct1, correct5, samples) in zip(self.eval_splits, sums.tolist()):
            metrics[f"{split}/loss"] = loss_sum / samples
            metrics[f"{split}/acc1"] = correct1 / samples
            if self.num_classes > 5:
                metrics[f"{split}/acc5"] = correct5 / samples
        # Values are already reduced over devices; every rank logs the same numbers. The names say
        # the split: no "/dataloader_idx_<i>" suffix.
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, add_dataloader_idx=False)

    # --- optimization ---------------------------------------------------------------------------

    def configure_optimizers(self):
        # estimated_stepping_batches sets up the train loader, so num_training_batches is known after it.
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, int(self.trainer.num_training_batches))
        optimizer, scheduler = build_optimizer(self.model, self.optim, self.global_batch_size, total_steps, steps_per_epoch,
                                               member_specs=self.member_optims)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
