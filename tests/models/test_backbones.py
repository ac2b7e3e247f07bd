"""Backbones: shapes, norm-layer plumbing, parameter counts against torchvision, options and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from mbn.models import MODEL_NAMES, build_model
from mbn.models.resnet import BasicBlock, Bottleneck

NORM_LAYERS = {
    "batchnorm": nn.BatchNorm2d,
    "groupnorm": lambda channels: nn.GroupNorm(4, channels),
    "identity": lambda channels: nn.Identity(),
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_size(name: str) -> int:
    return 64 if name.startswith("imagenet_") else 32


@pytest.mark.parametrize("norm", NORM_LAYERS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_with_every_norm_gives_logits_and_gradients(name, norm):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, norm_layer=NORM_LAYERS[norm], width=8)
    x = torch.randn(2, 3, input_size(name), input_size(name))
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_names_cover_the_configs():
    assert set(MODEL_NAMES) == {
        "resnet18", "resnet34", "resnet50", "vgg11", "vgg16",
        "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50",
    }


def test_cifar_resnet18_has_11_2m_parameters_and_differs_from_torchvision_only_in_the_stem():
    model = build_model("resnet18", num_classes=10, width=64)
    reference = torchvision.models.resnet18(num_classes=10)
    # torchvision's stem is a 7x7 conv; the CIFAR stem is 3x3 (the max-pool has no parameters).
    expected = num_params(reference) - 3 * 64 * 7 * 7 + 3 * 64 * 3 * 3
    assert num_params(model) == expected
    assert 11.1e6 < num_params(model) < 11.3e6


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_imagenet_resnets_match_torchvision_layer_by_layer(depth):
    model = build_model(f"imagenet_resnet{depth}", num_classes=1000)
    reference = getattr(torchvision.models, f"resnet{depth}")()
    ours = [tuple(t.shape) for t in model.state_dict().values()]
    theirs = [tuple(t.shape) for t in reference.state_dict().values()]
    assert ours == theirs


def test_imagenet_stem_downsamples_by_four_and_cifar_stem_keeps_resolution():
    cifar = build_model("resnet18", width=8)
    imagenet = build_model("imagenet_resnet18", width=8)
    x = torch.randn(1, 3, 64, 64)
    assert cifar.stem(x).shape[-2:] == (64, 64)
    assert imagenet.stem(x).shape[-2:] == (16, 16)


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "vgg16", "resnet50"])
@pytest.mark.parametrize("size", [16, 28, 84])
def test_cifar_models_accept_other_image_sizes(name, size):
    model = build_model(name, num_classes=5, width=4)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_width_scales_every_stage_and_in_channels_sets_the_stem():
    model = build_model("resnet50", width=16, in_channels=1)
    assert model.stem[0].in_channels == 1
    assert [model.layer1[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == [16, 128]
    assert model.fc.in_features == 16 * 8 * 4
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, convs", [("vgg11", 8), ("vgg16", 13), ("resnet18", 20), ("resnet50", 53)])
def test_norm_layer_follows_every_conv_with_its_channel_count(name, convs):
    requested: list[int] = []

    def recording_norm(channels: int) -> nn.Module:
        requested.append(channels)
        return nn.BatchNorm2d(channels)

    model = build_model(name, norm_layer=recording_norm, width=8)
    conv_channels = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(conv_channels) == convs
    assert sorted(requested) == sorted(conv_channels)
    without_norm = build_model(name, norm_layer=NORM_LAYERS["identity"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without_norm.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "imagenet_resnet34"])
def test_zero_init_residual_zeroes_the_last_norm_of_every_block_only_when_asked(name):
    blocks = lambda model: [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]  # noqa: E731
    model = build_model(name, width=8, zero_init_residual=True)
    assert blocks(model)
    for block in blocks(model):
        assert torch.count_nonzero(block.last_norm.weight) == 0
        assert torch.count_nonzero(block.norm1.weight) == block.norm1.weight.numel()
    for block in blocks(build_model(name, width=8)):
        assert torch.count_nonzero(block.last_norm.weight) == block.last_norm.weight.numel()


def test_zero_init_residual_makes_each_block_start_as_relu_of_its_shortcut():
    model = build_model("resnet18", width=8, zero_init_residual=True).eval()
    block = model.layer1[1]  # identity shortcut
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


@pytest.mark.parametrize("norm", ["identity", "groupnorm"])
def test_zero_init_residual_tolerates_norms_without_or_with_other_weights(norm):
    model = build_model("resnet18", width=8, norm_layer=NORM_LAYERS[norm], zero_init_residual=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_norm_layer_without_affine_weight_is_left_alone():
    affine_free = lambda channels: nn.BatchNorm2d(channels, affine=False)  # noqa: E731
    model = build_model("resnet18", width=8, norm_layer=affine_free, zero_init_residual=True)
    assert model.layer1[0].last_norm.weight is None


def test_unknown_model_name_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown model name 'resnet19'.*resnet18.*vgg16.*imagenet_resnet50"):
        build_model("resnet19")


@pytest.mark.parametrize("arg, value", [("width", 0), ("num_classes", -1), ("in_channels", 1.5), ("width", True)])
def test_bad_sizes_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=f"{arg} must be a positive integer"):
        build_model("resnet18", **{arg: value})


def test_zero_init_residual_is_rejected_for_vgg():
    with pytest.raises(ValueError, match="zero_init_residual"):
        build_model("vgg11", zero_init_residual=True)


PEERS = {"evonorm_b0": {}, "evonorm_s0": {"num_groups": 2}, "frn": {}}
OTHER_NORMS = {"bn": {}, "gn": {"num_groups": 2}, "brn": {}, "mbn": {}, "none": {}}


def _block_reference(block: nn.Module, x: torch.Tensor, relu_after_norm: bool) -> torch.Tensor:
    # The torchvision block forward, with or without the ReLU after each inner norm.
    act = nn.functional.relu if relu_after_norm else (lambda t: t)
    identity = x if block.downsample is None else block.downsample(x)
    if isinstance(block, BasicBlock):
        out = block.norm2(block.conv2(act(block.norm1(block.conv1(x)))))
    else:
        out = act(block.norm2(block.conv2(act(block.norm1(block.conv1(x))))))
        out = block.norm3(block.conv3(out))
    return nn.functional.relu(out + identity)


@pytest.mark.parametrize("norm", [*PEERS, *OTHER_NORMS])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11"])
def test_a_norm_activation_layer_replaces_the_relu_after_it_and_has_none_before_a_residual_addition(name, norm):
    # The peers: no ReLU after them, apply_act=False on every block's last norm and shortcut norm.
    # Every other norm: the torchvision network, ReLUs and forward exactly as before.
    from mbn.nn import includes_activation, norm_layer

    peer = norm in PEERS
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, norm_layer=norm_layer(norm, **{**PEERS, **OTHER_NORMS}[norm]), width=4)
    first = model.stem if name.startswith("resnet") else model.features  # conv, norm, activation, ...
    norm_type = type(first[1])
    pairs = [(a, b) for seq in model.modules() if isinstance(seq, nn.Sequential) for a, b in zip(seq, list(seq)[1:])]
    after_norms = [type(b) for a, b in pairs if type(a) is norm_type]
    assert after_norms and set(after_norms) == ({nn.Identity} if peer else {nn.ReLU})
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for block in blocks:
        last = [block.last_norm, *([] if block.downsample is None else [block.downsample[1]])]
        inner = [block.norm1, *([block.norm2] if isinstance(block, Bottleneck) else [])]
        assert all(includes_activation(n) == peer for n in last + inner)
        if peer:
            assert all(not n.apply_act for n in last) and all(n.apply_act for n in inner)
        x = torch.randn(2, block.conv1.in_channels, 4, 4)
        twin = copy.deepcopy(block)  # BRN/MBN/B0 update state in each training forward
        assert torch.equal(block(x), _block_reference(twin, x, relu_after_norm=not peer))
    assert bool(blocks) == name.startswith("resnet")
