"""Convolutions with weight centralization (Yan et al., ICLR 2020, Sec. 4.3), the half of MABN in front of the norm."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenteredConv1d", "CenteredConv2d", "CenteredConv3d", "centered", "centered_weight"]


def centered_weight(weight: Tensor) -> Tensor:
    """``weight`` minus its mean over the input-channel and kernel dimensions, per output channel.

    Args:
        weight: a convolution weight ``(C_out, C_in / groups, *kernel)``.

    Returns:
        The centered weight (differentiable: the parameter's gradient is projected, as in the paper).
    """
    return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class _CenteredConv:
    """The forward of a centered convolution: the convolution of the input with :func:`centered_weight`.

    Only ``padding_mode="zeros"`` (the default, and what the backbones use): other modes would need
    torch's private padding state.
    """

    _conv: Callable[..., Tensor]

    def _check_padding_mode(self) -> None:
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__}: only padding_mode='zeros' is supported, got {self.padding_mode!r}")

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``input`` with the centered weight."""
        return type(self)._conv(input, centered_weight(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class CenteredConv1d(_CenteredConv, nn.Conv1d):
    """``nn.Conv1d`` that convolves with its centered weight (same Args and state_dict keys as ``nn.Conv1d``)."""

    _conv = F.conv1d

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._check_padding_mode()


class CenteredConv2d(_CenteredConv, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses the weight minus its per-output-channel mean (weight centralization).

    MABN (Yan et al., 2020) normalizes by the second moment only, without subtracting a mean; the
    centered weights keep the convolution's output mean near zero so that is sound (the paper's
    Sec. 4.3, and ``CenConv2d`` in megvii-model/MABN). Same arguments, parameters and state_dict keys
    as ``nn.Conv2d``, so checkpoints load either way; only ``padding_mode="zeros"``.
    """

    _conv = F.conv2d

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._check_padding_mode()


class CenteredConv3d(_CenteredConv, nn.Conv3d):
    """``nn.Conv3d`` that convolves with its centered weight (same Args and state_dict keys as ``nn.Conv3d``)."""

    _conv = F.conv3d

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._check_padding_mode()


_CENTERED: dict[type[nn.Module], type[nn.Module]] = {nn.Conv1d: CenteredConv1d, nn.Conv2d: CenteredConv2d, nn.Conv3d: CenteredConv3d}


def centered(conv: nn.Module) -> nn.Module:
    """The centered version of a plain ``nn.Conv1d/2d/3d``, sharing its parameters; other modules unchanged.

    Args:
        conv: the convolution (a centered one, or any other module, is returned as it is).

    Returns:
        A :class:`CenteredConv2d` (1d, 3d) holding ``conv``'s own weight and bias parameters, in its
        train/eval mode; or ``conv``.

    Raises:
        ValueError: a convolution with a ``padding_mode`` other than ``"zeros"``.
    """
    cls = _CENTERED.get(type(conv))
    if cls is None:
        return conv
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
              device="meta")
    new.weight = conv.weight  # the same Parameter objects: an optimizer built before still trains them
    new.bias = conv.bias
    return new.train(conv.training)
