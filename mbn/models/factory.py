"""Build a backbone by name: the one place that maps config names to architectures."""

from __future__ import annotations

from typing import Callable

from torch import nn

from mbn.models.resnet import BasicBlock, Bottleneck, ResNet
from mbn.models.vgg import VGG, VGG_CONFIGS

NormLayer = Callable[[int], nn.Module]

_RESNET_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}

MODEL_NAMES: tuple[str, ...] = (
    *_RESNET_SPECS,
    *VGG_CONFIGS,
    *(f"imagenet_{name}" for name in _RESNET_SPECS),
)


def build_model(
    name: str,
    num_classes: int = 10,
    norm_layer: NormLayer = nn.BatchNorm2d,
    width: int = 64,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Build a classifier backbone.

    Args:
        name: one of :data:`MODEL_NAMES`. ``resnet*`` and ``vgg*`` are CIFAR-style (3x3 stem, stride 1,
            no max-pool); ``imagenet_resnet*`` use the 7x7/2 stem and max-pool for 224px images.
        num_classes: output logits.
        norm_layer: factory ``norm_layer(num_channels) -> nn.Module`` used after every convolution.
        width: base channels (64 = standard network; e.g. 16 for narrow CPU runs).
        in_channels: image channels.
        zero_init_residual: ResNets only: zero the last norm weight of each residual block.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: unknown ``name``, or non-positive ``num_classes``/``width``/``in_channels``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    for arg, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if name in VGG_CONFIGS:
        if zero_init_residual:
            raise ValueError(f"zero_init_residual applies to ResNets only, not to {name!r}")
        return VGG(VGG_CONFIGS[name], num_classes, norm_layer, width, in_channels)
    stem = "imagenet" if name.startswith("imagenet_") else "cifar"
    block, layers = _RESNET_SPECS[name.removeprefix("imagenet_")]
    return ResNet(block, layers, num_classes, norm_layer, width, in_channels, stem, zero_init_residual)
