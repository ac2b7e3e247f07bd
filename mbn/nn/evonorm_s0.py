"""EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020), with the channel count first.

A normalization-activation layer: it replaces a BatchNorm-ReLU pair (the paper's method). The
backbones drop the ReLU after it and build the norm before a residual addition with
``apply_act=False`` (:mod:`mbn.nn.activation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mbn.nn._input_checks import check_input
from mbn.nn.activation import NormActivation
from mbn.nn.group_norm import resolve_num_groups

__all__ = ["EvoNormS0"]


class EvoNormS0(NormActivation, nn.Module):
    """EvoNorm-S0 (Liu et al., 2020, Table 1), batch-independent; for inputs ``(N, C, *)`` of any rank >= 2.

    With ``s2_group`` the biased variance of each sample over its group's channels and positions
    (``C / G`` consecutive channels times ``*spatial``, as GroupNorm):

        y = x * sigmoid(v * x) / sqrt(s2_group + eps) * weight + bias

    ``v``, ``weight`` and ``bias`` are per channel, initialized to 1, 1 and 0 (the paper's TF
    reference code). Train and eval mode compute the same; there is no running state.

    Without its activation (``apply_act=False``, for a norm before a residual addition) the layer is
    ``y = x * weight + bias``, with no ``v``: the definition of timm's ``EvoNorm2dS0`` and of the
    authors' reference code (``nonlinearity=False``), which normalize nothing there (timm's
    variant ``EvoNorm2dS0a``, ``x / group std``, is not the paper's layer).

    DDP: no statistics across samples, so nothing is per device.

    Args:
        num_features: number of channels ``C``.
        num_groups: number of groups ``G`` (default 32, as GroupNorm, when ``group_size`` is not given).
        group_size: channels per group; ``G = C // group_size``. Give at most one of the two.
        eps: added to the group variance before the square root.
        apply_act: include the activation (``x * sigmoid(v * x)`` and the division); see above.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: invalid arguments, or channels not divisible by the groups (as :class:`~mbn.nn.GroupNorm`).
    """

    activation_parameter = "v"
    activation_init = 1.0

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        apply_act: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_affine_and_activation(num_features, eps, apply_act, {"device": device, "dtype": dtype})
        self.num_groups = resolve_num_groups(type(self).__name__, num_features, num_groups, group_size)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)``; see the class docstring."""
        check_input(self, input, ())
        shape = (1, -1) + (1,) * (input.dim() - 2)  # a per-channel vector against (N, C, *)
        if self.v is None:  # apply_act=False
            return torch.addcmul(self.bias.view(shape), input, self.weight.view(shape))
        grouped = input.reshape(input.shape[0], self.num_groups, -1)
        group_std = torch.sqrt(torch.var(grouped, dim=2, correction=0, keepdim=True) + self.eps)
        gated = input * torch.sigmoid(input * self.v.view(shape))
        normalized = (gated.reshape(grouped.shape) / group_std).reshape(input.shape)
        return torch.addcmul(self.bias.view(shape), normalized, self.weight.view(shape))

    def reset_parameters(self) -> None:
        """Reset the parameters to ``weight = v = 1``, ``bias = 0``."""
        nn.init.ones_(self.weight)
        if self.v is not None:
            nn.init.ones_(self.v)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, apply_act={self.apply_act}"
