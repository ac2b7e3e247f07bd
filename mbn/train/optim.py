"""The paper's optimizer recipe: SGD with linear lr scaling and a per-step step/cosine schedule."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from mbn.train.spec import OptimSpec



def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_params: bool) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    Args:
        model: the network.
        weight_decay: L2 penalty for the decayed group.
        decay_norm_params: if False, 1-d parameters (norm-layer affine weights, biases) get no decay.
    """
    if decay_norm_params:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decayed, plain = [], []
    for param in model.parameters():
        if param.requires_grad:
            (plain if param.ndim <= 1 else decayed).append(param)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_factor(spec: OptimSpec, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps.

    Milestones are fractions of ``total_steps``, so a shortened run keeps the shape of the paper's
    schedule (decays at 30/60/90% of training).

    Args:
        spec: schedule settings.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (for ``warmup_epochs``).
    """
    total_steps = max(1, total_steps)
    warmup_steps = int(round(spec.warmup_epochs * steps_per_epoch))
    boundaries = [int(round(fraction * total_steps)) for fraction in spec.milestones]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if spec.schedule == "cosine":
            start = min(warmup_steps, total_steps - 1)
            progress = min(1.0, max(0.0, (step - start) / max(1, total_steps - start)))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * spec.gamma ** sum(step >= boundary for boundary in boundaries)

    return factor


def build_optimizer(
    model: nn.Module, spec: OptimSpec, global_batch_size: int, total_steps: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD at ``spec.lr(global_batch_size)`` with a scheduler to be stepped after every optimizer step.

    Args:
        model: the network.
        spec: optimizer settings.
        global_batch_size: samples per optimizer step over all devices (for the linear scaling rule).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch.
    """
    groups: Iterable[dict] = parameter_groups(model, spec.weight_decay, spec.decay_norm_params)
    optimizer = torch.optim.SGD(
        groups, lr=spec.lr(global_batch_size), momentum=spec.momentum, nesterov=spec.nesterov
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, total_steps, steps_per_epoch))
    return optimizer, scheduler
