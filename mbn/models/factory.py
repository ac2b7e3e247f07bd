"""Build a backbone by name: the one place that maps config names to architectures."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence, Union

from torch import nn

from mbn.models.resnet import BasicBlock, Bottleneck, ResNet
from mbn.models.vgg import VGG, VGG_CONFIGS

NormLayer = Callable[[int], nn.Module]
# builder(num_classes, norm_layer, width, in_channels, **options) -> the model; its keyword-only
# parameters are the model's options (the fields of its mbn.train.spec.ModelSpec besides name and width).
ModelBuilder = Callable[..., nn.Module]

_RESNET_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def _resnet(block: type[nn.Module], layers: Sequence[int], stem: str) -> ModelBuilder:
    def build(num_classes: int, norm_layer: NormLayer, width: int, in_channels: int, *, zero_init_residual: bool = False) -> nn.Module:
        return ResNet(block, layers, num_classes, norm_layer, width, in_channels, stem, zero_init_residual)

    return build


def _vgg(config: Sequence[Union[int, str]]) -> ModelBuilder:
    def build(num_classes: int, norm_layer: NormLayer, width: int, in_channels: int) -> nn.Module:
        return VGG(config, num_classes, norm_layer, width, in_channels)

    return build


# The models by name. A new model is one entry here (its config schema: mbn.train.spec.MODEL_SCHEMAS;
# tests keep the names equal).
MODEL_BUILDERS: dict[str, ModelBuilder] = {
    **{name: _resnet(block, layers, "cifar") for name, (block, layers) in _RESNET_SPECS.items()},
    **{name: _vgg(config) for name, config in VGG_CONFIGS.items()},
    **{f"imagenet_{name}": _resnet(block, layers, "imagenet") for name, (block, layers) in _RESNET_SPECS.items()},
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_BUILDERS)


def model_options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments beyond the common ones) that :func:`build_model` takes for ``name``.

    Args:
        name: one of :data:`MODEL_NAMES`.

    Raises:
        ValueError: unknown ``name``.
    """
    parameters = inspect.signature(_builder(name)).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)


def build_model(
    name: str,
    num_classes: int = 10,
    norm_layer: NormLayer = nn.BatchNorm2d,
    width: int = 64,
    in_channels: int = 3,
    **options: Any,
) -> nn.Module:
    """Build a classifier backbone.

    Args:
        name: one of :data:`MODEL_NAMES`. ``resnet*`` and ``vgg*`` are CIFAR-style (3x3 stem, stride 1,
            no max-pool); ``imagenet_resnet*`` use the 7x7/2 stem and max-pool for 224px images.
        num_classes: output logits.
        norm_layer: factory ``norm_layer(num_channels) -> nn.Module`` used after every convolution.
        width: base channels (64 = standard network; e.g. 16 for narrow CPU runs).
        in_channels: image channels.
        **options: that model's options (:func:`model_options`): ResNets take ``zero_init_residual``
            (zero the last norm weight of each residual block).

    Returns:
        The model, in training mode.

    Raises:
        ValueError: unknown ``name`` or option, or non-positive ``num_classes``/``width``/``in_channels``.
    """
    builder = _builder(name)
    for arg, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    unknown = sorted(set(options) - set(model_options(name)))
    if unknown:
        accepted = ", ".join(model_options(name)) or "none"
        raise ValueError(f"model {name!r} takes no option {', '.join(unknown)}; its options: {accepted}")
    return builder(num_classes, norm_layer, width, in_channels, **options)


def _builder(name: str) -> ModelBuilder:
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return MODEL_BUILDERS[name]
