"""Members of a stack with their own learning rate and weight decay (MemberSGD) train as their single runs.

Error model: as tests/models/test_stack_exactness.py (the module docstring there and
tests/numerics.py): per tensor, norm-wise, ``||stacked - single||_F / ||single||_F <= TRAINING_GROWTH
* steps * eps(float64)``. MemberSGD adds one rounding per step and member to that model: member k's lr
is member 0's lr times the ratio of their lrs (one rounding of a scalar, 1 eps relative), where its
single run multiplies its own peak lr by the schedule's factor.

A real error is far outside it: stepping member 1 at member 2's lr makes its weights differ by
1e-3 relative after one step (checked).
"""

from __future__ import annotations

import pytest
import torch

from mbn.models import MemberSGD, member_lr, member_optimizer_state_dict, stack
from mbn.train.optim import parameter_groups
from numerics import assert_close_normwise
from stacking import TRAINING_GROWTH, assert_members_match, batches, build, set_all_progress, single_step, stacked_step

pytestmark = pytest.mark.numerics

LRS = (0.01, 0.03, 0.002)
WEIGHT_DECAYS = (5e-4, 0.0, 2e-3)
MOMENTUM = 0.9


def single_optimizer(model, lr, weight_decay, nesterov):
    # As mbn.train.optim.build_optimizer: 1-d parameters (norm affine, biases) are not decayed.
    return torch.optim.SGD(parameter_groups(model, weight_decay, decay_norm_params=False), lr=lr, momentum=MOMENTUM, nesterov=nesterov)


def stacked_optimizer(stacked, nesterov, weight_decays=WEIGHT_DECAYS):
    groups = [{"params": group["params"], "member_weight_decay": [wd * group["weight_decay"] for wd in weight_decays]}
              for group in parameter_groups(stacked, 1.0, decay_norm_params=False)]
    return MemberSGD(groups, num_members=len(LRS), lr=LRS[0], member_lr_scale=[lr / LRS[0] for lr in LRS],
                     member_weight_decay=weight_decays, momentum=MOMENTUM, nesterov=nesterov)


# Members' weight decays differ (a K-column per parameter) or are one value (SGD's own weight-decay op).
@pytest.mark.parametrize("norm, nesterov, weight_decays", [("bn", False, WEIGHT_DECAYS), ("mbn", True, WEIGHT_DECAYS), ("bn", False, (1e-3,) * 3)],
                         ids=["bn-momentum", "mbn-nesterov", "bn-one-weight-decay"])
def test_members_with_their_own_lr_and_weight_decay_match_their_single_runs_for_20_steps(norm, nesterov, weight_decays):
    singles = [build("resnet18", norm, seed) for seed in range(len(LRS))]
    stacked = stack(singles)
    optimizers = [single_optimizer(model, lr, wd, nesterov) for model, lr, wd in zip(singles, LRS, weight_decays)]
    optimizer = stacked_optimizer(stacked, nesterov, weight_decays)
    # The same lr schedule on both sides (as the runs' per-step LambdaLR): halved every 5 steps.
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5 ** (step // 5)) for o in [*optimizers, optimizer]]
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        set_all_progress([*singles, stacked], step)
        images, labels = batches(len(LRS), 8, 8, generator)
        expected = [single_step(model, opt, x, y) for model, opt, x, y in zip(singles, optimizers, images, labels)]
        losses = stacked_step(stacked, optimizer, images, labels)
        assert_close_normwise(losses, expected, dtype=torch.float64, steps=step + 1, growth=TRAINING_GROWTH, what="losses")
        for k, single in enumerate(optimizers):
            assert member_lr(optimizer, k) == pytest.approx(single.param_groups[0]["lr"], rel=4 * torch.finfo(torch.float64).eps)
        for schedule in schedules:
            schedule.step()
    assert_members_match(stacked, singles, steps=20, growth=TRAINING_GROWTH)
    for k, single in enumerate(optimizers):
        state, expected = member_optimizer_state_dict(optimizer, stacked, k), single.state_dict()
        # Member k's param groups are its single run's: its lr (and the schedule's base), its weight decay.
        for found, wanted in zip(state["param_groups"], expected["param_groups"]):
            assert found.keys() == wanted.keys()
            assert found["weight_decay"] == wanted["weight_decay"] and found["params"] == wanted["params"]
            for key in ("lr", "initial_lr"):
                assert found[key] == pytest.approx(wanted[key], rel=4 * torch.finfo(torch.float64).eps), key
        for index, entry in expected["state"].items():
            assert_close_normwise(state["state"][index]["momentum_buffer"], entry["momentum_buffer"], dtype=torch.float64,
                                  steps=20, growth=TRAINING_GROWTH, what=f"member {k} momentum buffer {index}")
    # The members really trained apart: the same seed at another lr ends elsewhere.
    assert len({round(loss, 6) for loss in losses}) == len(LRS)


def test_member_sgd_refuses_per_member_values_of_another_length():
    stacked = stack([build("vgg11", "bn", seed) for seed in range(2)])
    with pytest.raises(ValueError, match="member_lr_scale needs one value per member \\(2\\), got 3"):
        MemberSGD(stacked.parameters(), num_members=2, lr=0.1, member_lr_scale=[1, 2, 3], member_weight_decay=[0, 0])
