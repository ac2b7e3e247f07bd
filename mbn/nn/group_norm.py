"""Group Normalization (Wu & He, ECCV 2018) with the channel count first."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GroupNorm", "resolve_num_groups"]

# Groups when neither num_groups nor group_size is given (Wu & He, 2018).
DEFAULT_NUM_GROUPS = 32


def resolve_num_groups(layer: str, num_channels: int, num_groups: int | None, group_size: int | None) -> int:
    """The number of groups of a grouped norm layer given ``num_groups`` or ``group_size`` (or neither).

    Args:
        layer: the layer's class name, for the messages.
        num_channels: number of channels ``C``.
        num_groups: number of groups, or None.
        group_size: channels per group, or None; at most one of the two is given.

    Returns:
        ``num_groups``, ``num_channels // group_size``, or :data:`DEFAULT_NUM_GROUPS` when neither is given.

    Raises:
        ValueError: both or invalid ``num_groups``/``group_size``, or channels not divisible by the
            groups (the message names the layer and the numbers).
    """

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not positive_int(num_channels):
        raise ValueError(f"{layer}: num_channels must be a positive int, got {num_channels!r}")
    if num_groups is not None and group_size is not None:
        raise ValueError(f"{layer}({num_channels}): give num_groups or group_size, not both (got {num_groups} and {group_size})")
    if group_size is not None:
        if not positive_int(group_size):
            raise ValueError(f"{layer}({num_channels}): group_size must be a positive int, got {group_size!r}")
        if num_channels % group_size:
            raise ValueError(f"{layer}({num_channels}): {num_channels} channels are not divisible by group_size={group_size}")
        return num_channels // group_size
    if num_groups is None:
        num_groups = DEFAULT_NUM_GROUPS
    elif not positive_int(num_groups):
        raise ValueError(f"{layer}({num_channels}): num_groups must be a positive int, got {num_groups!r}")
    if num_channels % num_groups:
        raise ValueError(f"{layer}({num_channels}): {num_channels} channels are not divisible into num_groups={num_groups} groups")
    return num_groups


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` taking the channel count first, with ``num_groups`` or ``group_size``.

    Same parameters, state_dict keys and numerics as ``nn.GroupNorm``; only the construction
    differs, so it fits the ``norm_layer(num_channels)`` convention of the backbones.

    Args:
        num_channels: number of channels ``C``.
        num_groups: number of groups (default 32 when ``group_size`` is not given).
        group_size: channels per group; ``num_groups = num_channels // group_size``. Give at most
            one of ``num_groups`` and ``group_size``.
        eps: added to the variance before the square root.
        affine: learn a per-channel scale and shift.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: both or invalid ``num_groups``/``group_size``, or channels not divisible by the
            groups (the message names the layer and the numbers).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        num_groups = resolve_num_groups(type(self).__name__, num_channels, num_groups, group_size)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
