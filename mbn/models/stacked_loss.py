"""The loss of stacked runs: each member's mean cross-entropy, to be summed for the backward."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["member_cross_entropy"]


def member_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Each member's mean cross-entropy over its batch, as its single run computes it.

    ``member_cross_entropy(logits, labels).sum().backward()`` gives every member the gradient of
    its own loss: no member's loss depends on another's parameters. Sum the members to train
    (a mean would scale every member's gradient by ``1 / K``); to leave a member out (e.g. a
    frozen, diverged one), index the losses (``losses[active].sum()``) rather than multiply by a
    mask, since ``0 * nan`` is nan.

    Args:
        logits: ``(m, K, num_classes)``, as :class:`~mbn.models.StackedModel` returns them.
        labels: ``(m, K)`` class indices, as :class:`~mbn.data.StackedBatchLoader` yields them.
        label_smoothing: as for ``torch.nn.functional.cross_entropy``.

    Returns:
        ``(K,)`` losses.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (m, K, classes) and labels (m, K), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    # cross_entropy takes the classes in dim 1 and keeps the other dims: (m, K) per-sample losses.
    per_sample = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", label_smoothing=label_smoothing)
    return per_sample.mean(0)
