"""Stacked runs of the small-batch peers (MABN, CBN) train as their single runs.

Error model (tests/numerics.py, tests/models/test_stack_exactness.py): a stack computes each member's
numbers in another order than its single run (grouped convolutions, a batched linear layer), so the
two round differently in the last bits and training carries the difference on; compared per tensor,
norm-wise, within ``TRAINING_GROWTH * steps * eps(float64)`` (tests/models/stacking.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbn.models import (
    load_member_optimizer_state_dict,
    load_member_state_dict,
    member_optimizer_state_dict,
    stack,
    stacked_modules,
    unstack,
)
from mbn.models.stacked_layers import (
    StackedCenteredConv2d,
    StackedConv2d,
    StackedCrossIterationBatchNorm2d,
    StackedMovingAverageBatchNorm2d,
)
from mbn.nn import CrossIterationBatchNorm2d
from mbn.nn.cross_iteration_batchnorm import conv2d_statistics_derivatives
from numerics import ONE_PASS_GROWTH, assert_close_normwise
from stacking import SGD, TRAINING_GROWTH, assert_members_match, batches, build, single_step, stacked_step

pytestmark = pytest.mark.numerics

K = 3


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_stacked_mabn_runs_match_their_single_runs_for_20_sgd_steps(name):
    """Through MABN's warmup, renormalization warmup and full window (kwargs in tests/models/stacking.py)."""
    singles = [build(name, "mabn", seed) for seed in range(K)]
    stacked = stack(singles)
    layers = [layer for _, layer in stacked_modules(stacked)]
    assert any(isinstance(layer, StackedCenteredConv2d) for layer in layers)
    assert any(isinstance(layer, StackedMovingAverageBatchNorm2d) for layer in layers)
    single_optimizers = [torch.optim.SGD(model.parameters(), **SGD) for model in singles]
    optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        images, labels = batches(K, 8, 8, generator)
        expected = [single_step(*run, x, y) for run, x, y in zip(zip(singles, single_optimizers), images, labels)]
        losses = stacked_step(stacked, optimizer, images, labels)
        assert_close_normwise(losses, expected, dtype=torch.float64, steps=step + 1, growth=TRAINING_GROWTH, what="losses")
    assert_members_match(stacked, singles, steps=20, growth=TRAINING_GROWTH)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_stacked_cbn_runs_match_their_single_runs_for_20_sgd_steps(name):
    """Through CBN's burn-in and full window: each member compensates for its own convolution's change."""
    singles = [build(name, "cbn", seed) for seed in range(K)]
    stacked = stack(singles)
    norms = [layer for _, layer in stacked_modules(stacked) if isinstance(layer, StackedCrossIterationBatchNorm2d)]
    assert norms and all(isinstance(norm.preceding_layer, StackedConv2d) for norm in norms)
    single_optimizers = [torch.optim.SGD(model.parameters(), **SGD) for model in singles]
    optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        images, labels = batches(K, 8, 8, generator)
        expected = [single_step(*run, x, y) for run, x, y in zip(zip(singles, single_optimizers), images, labels)]
        losses = stacked_step(stacked, optimizer, images, labels)
        assert_close_normwise(losses, expected, dtype=torch.float64, steps=step + 1, growth=TRAINING_GROWTH, what="losses")
    assert_members_match(stacked, singles, steps=20, growth=TRAINING_GROWTH)
    # A member taken out trains on as its single run: its CBN layers are bound to its own convolutions.
    member = unstack(stacked)[1]
    modules = {id(module) for module in member.modules()}
    member_norms = [module for module in member.modules() if isinstance(module, CrossIterationBatchNorm2d)]
    assert len(member_norms) == len(norms)
    for norm in member_norms:
        conv = norm.preceding_layer
        assert type(norm) is CrossIterationBatchNorm2d and type(conv) is nn.Conv2d and id(conv) in modules
        assert conv.out_channels == norm.num_features
    optimizer_1 = torch.optim.SGD(member.parameters(), **SGD)
    optimizer_1.load_state_dict(member_optimizer_state_dict(optimizer, stacked, 1))
    images, labels = batches(1, 8, 8, generator)
    expected = single_step(singles[1], single_optimizers[1], images[0], labels[0])
    assert_close_normwise([single_step(member, optimizer_1, images[0], labels[0])], [expected], dtype=torch.float64,
                          steps=21, growth=TRAINING_GROWTH, what="loss of the unstacked member")


@pytest.mark.parametrize("norm", ["mabn", "cbn"])
def test_members_at_different_steps_train_as_their_single_runs(norm):
    # Member 1 resumes from a single run 3 steps ahead: its window slot and warmup / burn-in differ.
    singles = [build("resnet18", norm, seed) for seed in range(K)]
    stacked = stack(singles)
    single_optimizers = [torch.optim.SGD(model.parameters(), **SGD) for model in singles]
    optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        images, labels = batches(1, 8, 8, generator)
        single_step(singles[1], single_optimizers[1], images[0], labels[0])
    load_member_state_dict(stacked, 1, singles[1].state_dict())
    load_member_optimizer_state_dict(optimizer, stacked, 1, single_optimizers[1].state_dict())
    for step in range(6):
        images, labels = batches(K, 8, 8, generator)
        expected = [single_step(*run, x, y) for run, x, y in zip(zip(singles, single_optimizers), images, labels)]
        assert_close_normwise(stacked_step(stacked, optimizer, images, labels), expected, dtype=torch.float64,
                              steps=step + 1, growth=TRAINING_GROWTH, what="losses")
    assert_members_match(stacked, singles, steps=6, growth=TRAINING_GROWTH)
    stacked_class = StackedMovingAverageBatchNorm2d if norm == "mabn" else StackedCrossIterationBatchNorm2d
    layer = next(layer for _, layer in stacked_modules(stacked) if isinstance(layer, stacked_class))
    assert layer.member_steps == (6, 9, 6)


@pytest.mark.parametrize("path", ["grouped", "dense"])
def test_cbn_fast_derivatives_on_a_stacked_convolution_are_each_members_definition(path):
    """The one weight-gradient call (mbn.nn.cross_iteration_batchnorm.conv2d_statistics_derivatives)
    on a stacked convolution, either path, against autograd through that path's forward: each
    member's rows are its own derivatives (a single pass in another order: ONE_PASS_GROWTH * eps)."""
    generator = torch.Generator().manual_seed(3)
    singles = [nn.Conv2d(4, 6, 3, padding=1, bias=False).double() for _ in range(K)]
    for conv in singles:
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64))
    stacked = StackedConv2d.from_members(singles)
    stacked.path = path
    images = torch.randn(2, 4 * K, 5, 5, generator=generator, dtype=torch.float64)
    output = stacked(images)
    dmean, dsq = conv2d_statistics_derivatives(images, output, stacked)
    ones = torch.ones(6 * K, dtype=torch.float64)
    for name, actual, stat in (("d mean / d W", dmean, output.mean((0, 2, 3))), ("d sq / d W", dsq, output.square().mean((0, 2, 3)))):
        expected = torch.autograd.grad(stat, stacked.weight, ones, retain_graph=True)[0]
        assert_close_normwise(actual, expected, dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH, what=f"{path}: {name}")
