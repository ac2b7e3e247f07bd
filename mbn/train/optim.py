"""The paper's optimizer recipe: SGD with linear lr scaling and a per-step step/cosine schedule."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from mbn.models import MemberSGD
from mbn.models.stacked_optim import MEMBER_WEIGHT_DECAY
from mbn.train.spec import OptimSpec

# The optimizer settings in which the members of a stack may differ.
MEMBER_OPTIM_FIELDS = ("base_lr", "weight_decay")



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
    model: nn.Module, spec: OptimSpec, global_batch_size: int, total_steps: int, steps_per_epoch: int,
    member_specs: Sequence[OptimSpec] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD at ``spec.lr(global_batch_size)`` with a scheduler to be stepped after every optimizer step.

    Args:
        model: the network.
        spec: optimizer settings.
        global_batch_size: samples per optimizer step over all devices (for the linear scaling rule).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch.
        member_specs: for a stacked model whose members differ in ``base_lr`` or ``weight_decay``
            (and nothing else of this spec), each member's settings, member 0's being ``spec``:
            a :class:`~mbn.models.MemberSGD` then steps each member at its own lr and weight decay,
            and the schedule scales every member's lr as its single run's.

    Raises:
        ValueError: members that differ in another setting of the optimizer or its schedule.
    """
    for other in member_specs or ():
        differing = member_optim_difference(spec, other)
        if differing is not None:
            raise ValueError(f"members of a stack may differ in base_lr and weight_decay only, not in optim.{differing}")
    lr = spec.lr(global_batch_size)
    if member_specs is None or all((other.base_lr, other.weight_decay) == (spec.base_lr, spec.weight_decay) for other in member_specs):
        groups: Iterable[dict] = parameter_groups(model, spec.weight_decay, spec.decay_norm_params)
        optimizer: torch.optim.SGD = torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov)
    else:
        # Groups marked by a weight decay of 1 (decayed) or 0: each member's decay times the mark.
        groups = [
            {"params": group["params"], MEMBER_WEIGHT_DECAY: [other.weight_decay * group["weight_decay"] for other in member_specs]}
            for group in parameter_groups(model, 1.0, spec.decay_norm_params)
        ]
        scales = [other.lr(global_batch_size) / lr for other in member_specs]
        optimizer = MemberSGD(groups, num_members=len(member_specs), lr=lr, member_lr_scale=scales,
                              member_weight_decay=[other.weight_decay for other in member_specs],
                              momentum=spec.momentum, nesterov=spec.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, total_steps, steps_per_epoch))
    return optimizer, scheduler


def member_optim_difference(spec: OptimSpec, other: OptimSpec) -> str | None:
    """The first optimizer setting other than :data:`MEMBER_OPTIM_FIELDS` in which ``other`` differs
    from ``spec`` (two runs with one cannot train as one stack); None when there is none.

    Args:
        spec: one member's settings.
        other: another member's.
    """
    return next((field.name for field in dataclasses.fields(OptimSpec)
                 if field.name not in MEMBER_OPTIM_FIELDS and getattr(spec, field.name) != getattr(other, field.name)), None)
