"""Input and argument checks shared by the norm layers (MBN, Batch Renorm, EvoNorm, FRN)."""

from __future__ import annotations

import math

from torch import Tensor, nn


def check_input(layer: nn.Module, input: Tensor, input_dims: tuple[int, ...]) -> None:
    """Raise ValueError unless ``input`` is ``(N, C, *)`` with an allowed rank and C == num_features.

    Args:
        layer: the layer (for its name and ``num_features``).
        input: the input tensor.
        input_dims: allowed ranks; empty allows any rank >= 2.
    """
    if input_dims and input.dim() not in input_dims:
        raise ValueError(
            f"{type(layer).__name__}: expected a {' or '.join(f'{d}D' for d in input_dims)} input, "
            f"got {input.dim()}D with shape {tuple(input.shape)}"
        )
    if input.dim() < 2 or input.shape[1] != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}({layer.num_features}): expected input of shape (N, {layer.num_features}, ...), "
            f"got {tuple(input.shape)}"
        )


def check_training_batch(layer: nn.Module, input: Tensor) -> None:
    """Raise ValueError if a channel has a single value: its batch variance would be undefined."""
    if input.numel() <= layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}: expected more than 1 value per channel when training, "
            f"got input of shape {tuple(input.shape)}"
        )


def check_num_features(layer: str, num_features: object) -> None:
    """Raise ValueError unless ``num_features`` is a positive int (``layer`` names the class in the message)."""
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"{layer}: num_features must be a positive int, got {num_features!r}")


def check_int(layer: str, arg: str, value: object, low: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``low``; else ValueError naming the layer and argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{layer}: {arg} must be an int >= {low}, got {value!r}")
    return value


def check_number(layer: str, arg: str, value: object, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Args:
        layer: the class name, for the message.
        arg: the argument's name, for the message.
        value: the value to check.
        low: the lower bound.
        high: the upper bound (inclusive; inf = none).
        low_open: exclude ``low`` itself.

    Raises:
        ValueError: ``value`` is no such number (the message names the layer, the argument and the range).
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high == math.inf else ']'}"
        raise ValueError(f"{layer}: {arg} must be a finite number in {interval}, got {value!r}")
    return float(value)
