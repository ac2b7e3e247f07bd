"""The paper's optimizer recipe: linear lr scaling, milestones as fractions of training, cosine, warmup."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mbn.models import build_model
from mbn.nn import norm_layer
from mbn.train.optim import build_optimizer, lr_factor, parameter_groups
from mbn.train.spec import OptimSpec


def test_linear_scaling_rule():
    spec = OptimSpec()
    assert spec.lr(64) == pytest.approx(0.1)
    assert spec.lr(2) == pytest.approx(0.1 * 2 / 64)
    assert OptimSpec(base_lr=0.2, reference_batch_size=256).lr(32) == pytest.approx(0.025)


def test_step_schedule_decays_at_fractions_of_training():
    factor = lr_factor(OptimSpec(), total_steps=200, steps_per_epoch=10)
    assert [factor(s) for s in (0, 59, 60, 119, 120, 179, 180, 199)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    # A 10x shorter run keeps the shape: the decays move with it.
    short = lr_factor(OptimSpec(), total_steps=20, steps_per_epoch=1)
    assert [short(s) for s in (5, 6, 12, 18)] == pytest.approx([1, 0.1, 0.01, 0.001])


def test_cosine_schedule_and_warmup():
    cosine = lr_factor(OptimSpec(schedule="cosine"), total_steps=100, steps_per_epoch=10)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(50) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0, abs=1e-12)
    warm = lr_factor(OptimSpec(warmup_epochs=1.0), total_steps=100, steps_per_epoch=10)
    assert [warm(s) for s in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    warm_cosine = lr_factor(OptimSpec(schedule="cosine", warmup_epochs=1.0), total_steps=110, steps_per_epoch=10)
    assert warm_cosine(9) == pytest.approx(1.0) and warm_cosine(60) == pytest.approx(0.5)
    # The schedule's name is checked once, where the spec is defined: no OptimSpec holds a bad one.
    with pytest.raises(ValueError, match="schedule: unknown value 'linear'; expected one of step, cosine"):
        OptimSpec(schedule="linear")


def test_weight_decay_on_everything_or_not_on_norm_params():
    model = build_model("resnet18", num_classes=10, norm_layer=norm_layer("mbn"), width=4)
    (everything,) = parameter_groups(model, 1e-4, decay_norm_params=True)
    assert len(everything["params"]) == len(list(model.parameters())) and everything["weight_decay"] == 1e-4
    decayed, plain = parameter_groups(model, 1e-4, decay_norm_params=False)
    assert plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters()}
    assert norm_params and norm_params <= {id(p) for p in plain["params"]}


def test_built_optimizer_follows_the_schedule_step_by_step():
    model = nn.Linear(3, 2)
    optimizer, scheduler = build_optimizer(model, OptimSpec(), global_batch_size=2, total_steps=10, steps_per_epoch=5)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, False)
    lrs = []
    for _ in range(10):
        lrs.append(group["lr"])
        optimizer.step()
        scheduler.step()
    base = 0.1 * 2 / 64
    assert lrs == pytest.approx([base] * 3 + [base / 10] * 3 + [base / 100] * 3 + [base / 1000])
    assert not any(math.isnan(lr) for lr in lrs)
