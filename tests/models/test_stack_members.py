"""Stacking and unstacking: round trips, single-run checkpoints, per-member state, layouts and refusals.

Error model (tests/numerics.py): state that is copied (stacking, unstacking, loading a member) is
compared bit for bit; a stack's outputs are the single models' arithmetic in another order (grouped
convolutions, a batched linear layer, a vectorized loss), compared per tensor, norm-wise, within
``ONE_PASS_GROWTH * eps(float64)`` for one pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbn.models import (
    MODEL_NAMES,
    StackedModel,
    build_model,
    load_member_model,
    load_member_optimizer_state_dict,
    load_member_state_dict,
    member_cross_entropy,
    member_model,
    member_optimizer_state_dict,
    member_state_dict,
    stack,
    stacked_modules,
    unstack,
)
from mbn.models.stacked_layers import StackedBatchRenorm2d
from mbn.nn import BatchRenorm2d, MomentumBatchNorm2d, mbn_layers, norm_layer, set_progress
from numerics import ONE_PASS_GROWTH, assert_close_normwise
from stacking import NORMS, SGD, assert_state_dicts_equal, batches, build, stacked_step

K = 3


def python_state(model: nn.Module) -> list[tuple]:
    """The per-layer Python state a forward reads: MBN's schedule and first-batch flag, BRN's step."""
    state = []
    for name, module in model.named_modules():
        if isinstance(module, MomentumBatchNorm2d):
            state.append((name, module._epoch, module._total_epochs, module.lam, module.tau, module._initialized))
        elif isinstance(module, BatchRenorm2d):
            state.append((name, module._step))
    return state


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unstack_of_stack_gives_back_the_models_exactly(name, norm):
    models = [build(name, norm, seed) for seed in range(K)]
    set_progress(models[1], 4, 10)  # members may stand at different schedule positions
    stacked = stack(models)
    for original, member in zip(models, unstack(stacked)):
        assert [type(m) for m in member.modules()] == [type(m) for m in original.modules()]
        assert_state_dicts_equal(member.state_dict(), original.state_dict())
        assert python_state(member) == python_state(original)


def test_stacking_copies_and_does_not_touch_the_models_or_the_random_stream():
    models = [build("resnet18", "bn", seed) for seed in range(2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    torch.manual_seed(5)
    stacked = stack(models)
    after_stacking = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_stacking, torch.rand(3))  # stacking draws no random numbers
    with torch.no_grad():
        for param in stacked.parameters():
            param.add_(1)
    for model, state in zip(models, before):
        assert_state_dicts_equal(model.state_dict(), state)


@pytest.mark.numerics
def test_stacked_layout_is_member_blocks_along_channels_and_logits_are_m_by_k_by_classes():
    models = [build("vgg11", "bn", seed) for seed in range(K)]
    stacked = stack(models)
    conv = stacked.body.features[0]
    assert conv.groups == K and conv.weight.shape == (K * 4, 3, 3, 3)
    assert torch.equal(conv.weight[4:8], models[1].features[0].weight)
    assert stacked.body.features[1].num_batches_tracked.shape == (K,)
    assert stacked.body.classifier.weight.shape == (K * 5, 32)
    images, _ = batches(K, 2, 8, torch.Generator().manual_seed(0))
    stacked.eval()
    logits = stacked(torch.cat(images, 1))
    assert logits.shape == (2, K, 5)
    for k, model in enumerate(models):
        assert_close_normwise(logits[:, k], model.eval()(images[k]), dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH,
                              what=f"member {k} logits")


@pytest.mark.numerics
@pytest.mark.parametrize("norm", NORMS)
def test_a_trained_members_state_dict_loads_strictly_into_build_model_and_gives_its_outputs(norm):
    stacked = stack([build("resnet18", norm, seed) for seed in range(K)])
    optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        set_progress(stacked, 1 + step, 5)
        stacked_step(stacked, optimizer, *batches(K, 8, 8, generator))
    checkpoint = member_state_dict(stacked, 1)
    single = build("resnet18", norm, seed=99)  # other weights: all of them must come from the checkpoint
    single.load_state_dict(checkpoint, strict=True)
    stacked.eval()
    single.eval()
    images, _ = batches(K, 4, 8, generator)
    assert_close_normwise(stacked(torch.cat(images, 1))[:, 1], single(images[1]), dtype=torch.float64, steps=1,
                          growth=ONE_PASS_GROWTH, what="member 1 logits")


def test_load_member_state_dict_replaces_one_member_and_leaves_the_others():
    models = [build("resnet18", "brn", seed) for seed in range(K)]
    stacked = stack(models)
    replacement = build("resnet18", "brn", seed=7)
    replacement.stem[1].num_batches_tracked.fill_(11)
    replacement.stem[1]._sync_with_buffers()
    result = load_member_state_dict(stacked, 2, replacement.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert_state_dicts_equal(member_state_dict(stacked, 2), replacement.state_dict())
    for k in (0, 1):
        assert_state_dicts_equal(member_state_dict(stacked, k), models[k].state_dict())
    assert stacked.body.stem[1].member_steps == (0, 0, 11)  # the Python mirror of the loaded buffer
    with pytest.raises(RuntimeError, match="Missing key"):
        load_member_state_dict(stacked, 0, {"fc.bias": torch.zeros(5)})


def test_load_member_model_refuses_another_architecture_naming_the_module():
    stacked = stack([build("resnet18", "bn", seed) for seed in range(2)])
    before = member_state_dict(stacked, 0)
    with pytest.raises(ValueError, match="'stem.1'.*GroupNorm instead of BatchNorm2d"):
        load_member_model(stacked, 0, build("resnet18", "gn", seed=5))
    assert_state_dicts_equal(member_state_dict(stacked, 0), before)  # not half loaded
    with pytest.raises(ValueError, match="no module 'stem.0'"):
        load_member_model(stacked, 0, build("vgg11", "bn", seed=0))
    with pytest.raises(ValueError, match=r"member index must be an int in \[0, 2\)"):
        member_model(stacked, 2)


def test_set_progress_reaches_every_member_and_set_member_progress_one():
    models = [build("resnet18", "mbn", seed) for seed in range(K)]
    stacked = stack(models)
    assert set_progress(stacked, 6, 10) == len(mbn_layers(models[0]))
    for model in models:
        set_progress(model, 6, 10)
    layer = stacked.body.stem[1]
    stacked.train()
    images, _ = batches(K, 8, 8, torch.Generator().manual_seed(0))
    stacked(torch.cat(images, 1))  # m becomes known: lam > 0
    for model, x in zip(models, images):
        model(x)
    assert layer.lam == models[0].stem[1].lam > 0
    layer.set_member_progress(1, 2, 10)
    set_progress(models[1].stem[1], 2, 10)
    assert layer.member_lams == tuple(model.stem[1].lam for model in models)
    with pytest.raises(ValueError, match="members have different lam"):
        layer.lam
    assert python_state(member_model(stacked, 1))[0] == python_state(models[1])[0]


def test_optimizer_state_of_one_member_round_trips_and_a_member_without_momentum_gets_zeros():
    stacked = stack([build("vgg11", "bn", seed) for seed in range(K)])
    optimizer = torch.optim.SGD(stacked.parameters(), **SGD)
    stacked_step(stacked, optimizer, *batches(K, 8, 8, torch.Generator().manual_seed(0)))
    state = member_optimizer_state_dict(optimizer, stacked, 1)
    single = build("vgg11", "bn", seed=1)
    single_optimizer = torch.optim.SGD(single.parameters(), **SGD)
    single_optimizer.load_state_dict(state)  # it is a single run's optimizer state
    fresh = torch.optim.SGD(single.parameters(), **SGD).state_dict()
    load_member_optimizer_state_dict(optimizer, stacked, 1, fresh)
    assert all(not member_optimizer_state_dict(optimizer, stacked, 1)["state"][i]["momentum_buffer"].any() for i in state["state"])
    load_member_optimizer_state_dict(optimizer, stacked, 1, state)
    for index, entry in member_optimizer_state_dict(optimizer, stacked, 1)["state"].items():
        assert torch.equal(entry["momentum_buffer"], state["state"][index]["momentum_buffer"])
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        member_optimizer_state_dict(torch.optim.Adam(stacked.parameters()), stacked, 0)
    with pytest.raises(ValueError, match="param groups hold"):
        load_member_optimizer_state_dict(optimizer, stacked, 0, {"state": {}, "param_groups": [{"params": [0]}]})


@pytest.mark.numerics
def test_member_cross_entropy_is_each_members_mean_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, K, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (6, K), generator=generator)
    expected = torch.stack([nn.functional.cross_entropy(logits[:, k], labels[:, k]) for k in range(K)])
    assert_close_normwise(member_cross_entropy(logits, labels), expected, dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH)
    with pytest.raises(ValueError, match=r"logits \(m, K, classes\) and labels \(m, K\)"):
        member_cross_entropy(logits, labels[:, :2])


def test_stacked_model_checks_its_input_channels():
    stacked = stack([build("resnet18", "none", seed) for seed in range(2)])
    with pytest.raises(ValueError, match=r"expected input of shape \(m, 6, \.\.\.\), got \(2, 3, 8, 8\)"):
        stacked(torch.zeros(2, 3, 8, 8, dtype=torch.float64))


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    "models, message",
    [
        ([], "at least one model"),
        (lambda: [build("resnet18", "bn", 0), build("vgg11", "bn", 1)], "another architecture than model 0"),
        (lambda: [build("resnet18", "bn", 0), build("resnet18", "bn", 1, width=8)], r"cannot stack 'stem.0': member 1 differs .*Conv2d\(3, 8"),
        (lambda: [build("resnet18", "bn", 0), build("resnet18", "gn", 1)], "cannot stack 'stem.1': GroupNorm in model 1, BatchNorm2d in model 0"),
        (
            lambda: [build_model("vgg11", norm_layer=norm_layer("mbn", ideal_batch_size=m0), width=4) for m0 in (32, 16)],
            r"cannot stack 'features.1': member 1 differs.*ideal_batch_size=16",
        ),
        (lambda: [build("vgg11", "bn", 0), build("vgg11", "bn", 1).float()], r"'features.0'.*torch.float32"),
        (lambda: [build("vgg11", "bn", 0), build("vgg11", "bn", 1).eval()], "training=False instead of True"),
        (lambda: [nn.Sequential(nn.Conv2d(3, 4, 3), Scale())] * 2, r"cannot stack '1': .*Scale is not a module stack\(\) knows"),
        (lambda: [Wrapper(), Wrapper()], r"cannot stack the model \(Wrapper\): .*Wrapper is not a module"),
        (lambda: [nn.Sequential(nn.Softmax(1))] * 2, "Softmax is not a module"),
        (lambda: [nn.Sequential(nn.BatchNorm2d(4, momentum=None))] * 2, "momentum=None"),
    ],
)
def test_stack_refuses_what_it_cannot_stack_naming_the_module(models, message):
    with pytest.raises(ValueError, match=message):
        stack(models() if callable(models) else models)


def test_stack_refuses_non_modules():
    with pytest.raises(TypeError, match="entry 1 is a str"):
        stack([nn.Identity(), "model"])


def test_stacked_modules_are_named_as_in_the_member_model():
    stacked = stack([build("resnet18", "brn", seed) for seed in range(2)])
    assert isinstance(stacked, StackedModel) and stacked.num_members == 2
    layers = dict(stacked_modules(stacked))
    assert list(layers)[:3] == ["stem.0", "stem.1", "layer1.0.conv1"] and list(layers)[-1] == "fc"
    assert isinstance(layers["layer4.1.norm2"], StackedBatchRenorm2d)
    assert "members=2" in repr(layers["stem.0"])
