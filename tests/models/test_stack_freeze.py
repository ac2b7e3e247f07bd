"""Freezing one member: it stays bit-identical, also when diverged, while the others match their single runs.

Error model: the frozen member is compared with its own state at the freeze, bit for bit (the same
numbers, not recomputed); the other members with their single runs per tensor, norm-wise, within
``TRAINING_GROWTH * steps * eps(float64)`` (tests/models/stacking.py).
"""

from __future__ import annotations

import pytest
import torch

from mbn.models import freeze_member, member_optimizer_state_dict, member_state_dict, stack
from stacking import SGD, TRAINING_GROWTH, assert_members_match, assert_state_dicts_equal, batches, build, set_all_progress, single_step, stacked_step

K = 3


def train_side_by_side(norm: str, steps: int, freeze_at: int, poison: bool = False):
    """Train K single runs and their stack; freeze member 1 of the stack after ``freeze_at`` steps."""
    singles = [build("resnet18", norm, seed) for seed in range(K)]
    stacked = stack(singles)
    single_optimizers = [torch.optim.SGD(model.parameters(), **SGD) for model in singles]
    optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    generator = torch.Generator().manual_seed(0)
    frozen = None
    for step in range(steps):
        if step == freeze_at:
            if poison:  # member 1 diverged: nan weights in its first convolution
                with torch.no_grad():
                    stacked.body.stem[0].weight[4:8].fill_(float("nan"))
            frozen = freeze_member(stacked, 1, optimizer)
            state_at_freeze = member_state_dict(stacked, 1)
            momentum_at_freeze = member_optimizer_state_dict(optimizer, stacked, 1)
        set_all_progress([*singles, stacked], step)
        images, labels = batches(K, 8, 8, generator)
        for k, (model, single_optimizer) in enumerate(zip(singles, single_optimizers)):
            if frozen is None or k != 1:
                single_step(model, single_optimizer, images[k], labels[k])
        stacked_step(stacked, optimizer, images, labels)
    return stacked, singles, optimizer, frozen, state_at_freeze, momentum_at_freeze


@pytest.mark.parametrize("norm", ["bn", "mbn", "brn"])
def test_a_frozen_member_stays_bit_identical_under_momentum_and_weight_decay(norm):
    stacked, singles, optimizer, frozen, state_at_freeze, momentum_at_freeze = train_side_by_side(norm, steps=8, freeze_at=4)
    assert_state_dicts_equal(member_state_dict(stacked, 1), state_at_freeze)
    for index, entry in momentum_at_freeze["state"].items():
        assert torch.equal(member_optimizer_state_dict(optimizer, stacked, 1)["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    assert_members_match(stacked, singles, steps=8, growth=TRAINING_GROWTH, skip=(1,))
    if norm == "brn":  # the Python mirror of the restored step counter is restored too
        assert stacked.body.stem[1].member_steps == (8, 4, 8)


def test_a_diverged_frozen_member_leaks_no_nan_into_the_others_and_gets_zero_gradients():
    stacked, singles, optimizer, frozen, state_at_freeze, _ = train_side_by_side("mbn", steps=6, freeze_at=2, poison=True)
    member = member_state_dict(stacked, 1)
    assert torch.isnan(member["stem.0.weight"]).all()
    assert_state_dicts_equal(member, state_at_freeze, equal_nan=True)
    assert_members_match(stacked, singles, steps=6, growth=TRAINING_GROWTH, skip=(1,))
    grad = stacked.body.layer1[0].conv1.weight.grad.view(K, -1)
    assert not grad[1].any() and grad[0].any() and torch.isfinite(grad).all()


def test_remove_unfreezes_the_member():
    stacked, _, optimizer, frozen, state_at_freeze, _ = train_side_by_side("bn", steps=4, freeze_at=2)
    frozen.remove()
    images, labels = batches(K, 8, 8, torch.Generator().manual_seed(1))
    stacked_step(stacked, optimizer, images, labels)
    moved = member_state_dict(stacked, 1)
    assert not torch.equal(moved["fc.weight"], state_at_freeze["fc.weight"])
    assert moved["stem.1.num_batches_tracked"] == state_at_freeze["stem.1.num_batches_tracked"] + 1
