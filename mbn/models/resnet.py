"""ResNets with a pluggable normalization layer: CIFAR stem (3x3, stride 1) or ImageNet stem (7x7/2 + max-pool).

One implementation serves both variants; only the stem differs (He et al., 2016, Sec. 4.2 for CIFAR).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence, Type, Union

import torch
from torch import nn

from mbn.nn import drop_activations, includes_activation
from mbn.nn.preceding_layer import conv_norm

NormLayer = Callable[[int], nn.Module]
Stem = Literal["cifar", "imagenet"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # bias is redundant in front of a norm layer; with nn.Identity the network is bias-free, as in torchvision.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1
    # Norms whose output is added to the residual: no activation there (mbn.nn.activation).
    norms_before_addition = ("norm2", "downsample.1")

    def __init__(
        self, in_channels: int, channels: int, stride: int, norm_layer: NormLayer, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv_norm(conv3x3(in_channels, channels, stride), norm_layer, channels)
        self.conv2, self.norm2 = conv_norm(conv3x3(channels, channels), norm_layer, channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        drop_activations(self)

    @property
    def last_norm(self) -> nn.Module:
        return self.norm2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.norm1(self.conv1(x))
        out = out if includes_activation(self.norm1) else self.relu(out)
        out = self.norm2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "ResNet v1.5"), 1x1 expand, with a residual connection."""

    expansion = 4
    norms_before_addition = ("norm3", "downsample.1")  # as BasicBlock's

    def __init__(
        self, in_channels: int, channels: int, stride: int, norm_layer: NormLayer, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1, self.norm1 = conv_norm(conv1x1(in_channels, channels), norm_layer, channels)
        self.conv2, self.norm2 = conv_norm(conv3x3(channels, channels, stride), norm_layer, channels)
        self.conv3, self.norm3 = conv_norm(conv1x1(channels, out_channels), norm_layer, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        drop_activations(self)

    @property
    def last_norm(self) -> nn.Module:
        return self.norm3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.norm1(self.conv1(x))
        out = out if includes_activation(self.norm1) else self.relu(out)
        out = self.norm2(self.conv2(out))
        out = out if includes_activation(self.norm2) else self.relu(out)
        out = self.norm3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet classifier with four stages of widths ``width * (1, 2, 4, 8)``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: output logits.
        norm_layer: factory ``norm_layer(num_channels) -> nn.Module`` used after every convolution; each
            norm gets the convolution in front of it when it asks (:func:`mbn.nn.bind_norm`: MABN
            centers it, CBN keeps its weight). A normalization-activation layer (EvoNorm, FRN) replaces
            the ReLU after it, and runs without its activation before a residual addition
            (:mod:`mbn.nn.activation`).
        width: channels of the stem and the first stage (64 = the standard network).
        in_channels: image channels.
        stem: ``"cifar"`` (3x3 conv, stride 1, no max-pool; for 32px images) or ``"imagenet"``
            (7x7 conv, stride 2, 3x3 max-pool; for 224px images).
        zero_init_residual: set the weight of the last norm layer of every block to zero so each block
            starts as the identity (Goyal et al., 2017). Norm layers without a weight are left alone.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 10,
        norm_layer: NormLayer = nn.BatchNorm2d,
        width: int = 64,
        in_channels: int = 3,
        stem: Stem = "cifar",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            stem_conv: nn.Module = conv3x3(in_channels, width)
        elif stem == "imagenet":
            stem_conv = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        stem_layers: list[nn.Module] = [*conv_norm(stem_conv, norm_layer, width), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            stem_layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = drop_activations(nn.Sequential(*stem_layers))

        self._norm_layer = norm_layer
        self._in_channels = width
        self.layer1 = self._make_stage(block, width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(block, width * 8, layers[3], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    zero_norm_weight(module.last_norm)

    def _make_stage(self, block: Block, channels: int, num_blocks: int, stride: int) -> nn.Sequential:
        out_channels = channels * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(*conv_norm(conv1x1(self._in_channels, out_channels, stride), self._norm_layer, out_channels))
        blocks = [block(self._in_channels, channels, stride, self._norm_layer, downsample)]
        self._in_channels = out_channels
        blocks += [block(out_channels, channels, 1, self._norm_layer, None) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def zero_norm_weight(norm: nn.Module) -> None:
    """Zero the affine scale of ``norm`` if it has one (``nn.Identity`` and affine-free norms have none)."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        with torch.no_grad():
            weight.zero_()
