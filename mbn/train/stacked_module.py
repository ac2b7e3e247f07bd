"""LightningModule of a stacked run: K members' classification losses and metrics, one model."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mbn.models import StackedModel, freeze_member, member_cross_entropy
from mbn.models.freeze import FrozenMember
from mbn.train.module import ClassificationModule, DivergedError
from mbn.train.spec import OptimSpec


def member_metric(k: int, name: str) -> str:
    """The name under which a stacked run logs member ``k``'s metric ``name`` (``member0/test/acc1``).

    Args:
        k: member index.
        name: the single run's metric name.
    """
    return f"member{k}/{name}"


class StackedClassificationModule(ClassificationModule):
    """:class:`ClassificationModule` for a :class:`~mbn.models.StackedModel`: each member's own loss and metrics.

    The loss is the sum of the members' mean cross-entropies, so each member gets its single
    run's gradient. Metrics are logged per member under :func:`member_metric` names. A member whose
    summed training loss turns NaN/inf (checked as in the single run) is frozen
    (:func:`~mbn.models.freeze_member`) and left out of the loss from then on; it is recorded in
    :attr:`diverged` and the others train on. When every member has diverged the run stops with
    :class:`DivergedError`.

    Args:
        model: the stacked network.
        optim: optimizer and schedule settings (shared by the members).
        global_batch_size: samples per optimizer step of one member.
        num_classes: number of classes.
        check_finite_every_n_steps: divergence check interval in steps.
        total_epochs: planned epochs T of the MBN schedule (None = the Trainer's ``max_epochs``).
        eval_splits: the names of the evaluation dataloaders, in order (as for :class:`ClassificationModule`).
        member_optims: each member's optimizer settings when they differ in ``base_lr`` or
            ``weight_decay`` (member 0's is ``optim``; see :func:`~mbn.train.optim.build_optimizer`).
    """

    def __init__(
        self,
        model: StackedModel,
        optim: OptimSpec,
        global_batch_size: int,
        num_classes: int,
        check_finite_every_n_steps: int = 25,
        total_epochs: int | None = None,
        eval_splits: tuple[str, ...] = ("test",),
        member_optims: Sequence[OptimSpec] | None = None,
    ) -> None:
        super().__init__(model, optim, global_batch_size, num_classes, check_finite_every_n_steps, total_epochs, eval_splits)
        self.member_optims = list(member_optims) if member_optims is not None else None
        self.num_members = model.num_members
        # member -> the error message of its divergence (as the single run's DivergedError says it).
        self.diverged: dict[int, str] = {}
        self._frozen: list[FrozenMember] = []

    def _active_members(self) -> list[int]:
        return [k for k in range(self.num_members) if k not in self.diverged]

    def on_train_epoch_start(self) -> None:
        # Per member: [batch-mean loss sum, correct top-1, samples, batches].
        self._train_sums = torch.zeros(self.num_members, 4, device=self.device, dtype=torch.float64)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        losses = member_cross_entropy(logits, y)
        sums = self._train_sums
        sums[:, 0] += losses.detach()
        sums[:, 1] += (logits.detach().argmax(2) == y).sum(0)
        sums[:, 2] += y.shape[0]
        sums[:, 3] += 1
        if self.finite_check_due(batch_idx):
            self._freeze_diverged(batch_idx)
        # Indexing, not masking: 0 * nan is nan. The diverged members' losses reach no gradient.
        return losses[self._active_members()].sum()

    def _freeze_diverged(self, batch_idx: int) -> None:
        finite = torch.isfinite(self._train_sums[:, 0]).tolist()  # the check's one host sync
        for k in self._active_members():
            if not finite[k]:
                self.diverged[k] = (
                    f"DivergedError: non-finite training loss ({self._train_sums[k, 0].item()}) in epoch "
                    f"{self.current_epoch + 1} by step {batch_idx + 1} of {self.trainer.num_training_batches}"
                )
                self._frozen.append(freeze_member(self.model, k, self.trainer.optimizers[0]))
        if not self._active_members():
            raise DivergedError(f"every member of the stack diverged (the last in epoch {self.current_epoch + 1} by step {batch_idx + 1})")

    def train_epoch_metrics(self) -> dict[str, float]:
        """Each member's mean training loss and top-1 accuracy of the current epoch, under :func:`member_metric` names."""
        if self._train_sums is None:
            return {}
        metrics = {}
        for k, (loss_sum, correct, samples, batches) in enumerate(self._train_sums.tolist()):
            if batches:
                metrics[member_metric(k, "train/loss")] = loss_sum / batches
                metrics[member_metric(k, "train/acc1")] = correct / samples
        return metrics

    def on_validation_epoch_start(self) -> None:
        # Per evaluation split and member: [loss sum (per sample), correct top-1, correct top-5, samples].
        self._val_sums = torch.zeros(len(self.eval_splits), self.num_members, 4, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self.model(x)
        sums = self._val_sums[dataloader_idx]
        sums[:, 0] += F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").sum(0)
        topk = logits.topk(min(5, logits.shape[2]), dim=2).indices
        hits = topk == y.unsqueeze(2)
        sums[:, 1] += hits[..., 0].sum(0)
        sums[:, 2] += hits.any(2).sum(0)
        sums[:, 3] += y.shape[0]

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for split, split_sums in zip(self.eval_splits, self._val_sums.tolist()):
            for k, (loss_sum, correct1, correct5, samples) in enumerate(split_sums):
                metrics[member_metric(k, f"{split}/loss")] = loss_sum / samples
                metrics[member_metric(k, f"{split}/acc1")] = correct1 / samples
                if self.num_classes > 5:
                    metrics[member_metric(k, f"{split}/acc5")] = correct5 / samples
        self.log_dict(metrics, on_step=False, on_epoch=True, add_dataloader_idx=False)
