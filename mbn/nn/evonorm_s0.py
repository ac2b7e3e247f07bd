"""EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020), with the channel count first.

Normalization-activation layers replace a BatchNorm-ReLU pair. Where a backbone has ``norm_layer(C)``
followed by a ReLU, the ReLU stays (as after GN in these backbones): unlike the paper, where the layer
replaces both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mbn.nn._input_checks import check_input, check_num_features, check_number
from mbn.nn.group_norm import resolve_num_groups

__all__ = ["EvoNormS0"]


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al., 2020, Table 1), batch-independent; for inputs ``(N, C, *)`` of any rank >= 2.

    With ``s2_group`` the biased variance of each sample over its group's channels and positions
    (``C / G`` consecutive channels times ``*spatial``, as GroupNorm):

        y = x * sigmoid(v * x) / sqrt(s2_group + eps) * weight + bias

    ``v``, ``weight`` and ``bias`` are per channel, initialized to 1, 1 and 0 (the paper's TF
    reference code). Train and eval mode compute the same; there is no running state.

    DDP: no statistics across samples, so nothing is per device.

    Args:
        num_features: number of channels ``C``.
        num_groups: number of groups ``G`` (default 32, as GroupNorm, when ``group_size`` is not given).
        group_size: channels per group; ``G = C // group_size``. Give at most one of the two.
        eps: added to the group variance before the square root.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: invalid arguments, or channels not divisible by the groups (as :class:`~mbn.nn.GroupNorm`).
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_num_features(name, num_features)
        self.num_features = num_features
        self.num_groups = resolve_num_groups(name, num_features, num_groups, group_size)
        self.eps = check_number(name, "eps", eps, 0.0)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.v = nn.Parameter(torch.ones(num_features, **factory))

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)``; see the class docstring."""
        check_input(self, input, ())
        shape = (1, -1) + (1,) * (input.dim() - 2)  # a per-channel vector against (N, C, *)
        grouped = input.reshape(input.shape[0], self.num_groups, -1)
        group_std = torch.sqrt(torch.var(grouped, dim=2, correction=0, keepdim=True) + self.eps)
        gated = input * torch.sigmoid(input * self.v.view(shape))
        normalized = (gated.reshape(grouped.shape) / group_std).reshape(input.shape)
        return torch.addcmul(self.bias.view(shape), normalized, self.weight.view(shape))

    def reset_parameters(self) -> None:
        """Reset the parameters to ``weight = v = 1``, ``bias = 0``."""
        nn.init.ones_(self.weight)
        nn.init.ones_(self.v)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"
