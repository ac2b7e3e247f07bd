"""Input checks shared by the batch-statistics layers (MBN, Batch Renorm)."""

from __future__ import annotations

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
