"""VGG with a normalization layer after every convolution (the "VGG-BN" family, CIFAR-sized classifier)."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

from mbn.nn import drop_activations
from mbn.nn.preceding_layer import conv_norm

NormLayer = Callable[[int], nn.Module]

# Stage widths in units of ``width`` (64 = standard), "M" = 2x2 max-pool (Simonyan & Zisserman, 2015, Table 1).
VGG_CONFIGS: dict[str, list[Union[int, str]]] = {
    "vgg11": [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    "vgg16": [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
}


class VGG(nn.Module):
    """Conv-norm-ReLU stacks with max-pooling, global average pooling and one linear classifier.

    The single linear layer on globally pooled features (as in most CIFAR VGG variants) suits 32px
    inputs, where the last feature map is already 1x1, and keeps the model independent of the input
    size. Max-pools use ``ceil_mode`` so inputs smaller than 32px (or not divisible by 32) also work.

    Args:
        config: per-layer channel multipliers of ``width`` and ``"M"`` for max-pools (see ``VGG_CONFIGS``).
        num_classes: output logits.
        norm_layer: factory ``norm_layer(num_channels) -> nn.Module`` applied after every convolution
            (handed that convolution when it asks, :func:`mbn.nn.bind_norm`); a normalization-activation
            layer (EvoNorm, FRN) replaces the ReLU after it.
        width: channels of the first convolution (64 = standard).
        in_channels: image channels.
    """

    def __init__(
        self,
        config: Sequence[Union[int, str]],
        num_classes: int = 10,
        norm_layer: NormLayer = nn.BatchNorm2d,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                out_channels = width * int(item)
                conv = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
                layers += [*conv_norm(conv, norm_layer, out_channels), nn.ReLU(inplace=True)]
                channels = out_channels
        self.features = drop_activations(nn.Sequential(*layers))  # no ReLU after a norm-activation layer
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
