"""How a backbone hands a norm layer the layer in front of it, for the norms that need it (MABN, CBN).

The torchvision-style ``norm_layer(num_channels)`` callable stays the one way a model gets its norm.
A norm that depends on the layer in front of it (Cross-Iteration BN needs that convolution's weight,
MABN centers that convolution's weight) defines ``bind_preceding(layer) -> layer``; the backbone
builds the convolution, then the norm, then keeps ``bind_norm(conv, norm)`` as its convolution.
For every other norm ``bind_norm`` returns the convolution unchanged.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["bind_norm", "conv_norm", "needs_preceding_layer", "relink_preceding_layers"]


def needs_preceding_layer(norm: nn.Module) -> bool:
    """Whether ``norm`` asks for the layer in front of it (defines ``bind_preceding``)."""
    return callable(getattr(norm, "bind_preceding", None))


def bind_norm(layer: nn.Module, norm: nn.Module) -> nn.Module:
    """Hand ``layer`` (the convolution whose output ``norm`` normalizes) to ``norm`` if it asks for it.

    Args:
        layer: the layer directly in front of ``norm``.
        norm: the normalization layer.

    Returns:
        The layer to use in place of ``layer``: ``layer`` itself, or, for MABN, its centered version
        sharing its parameters.
    """
    return norm.bind_preceding(layer) if needs_preceding_layer(norm) else layer


def conv_norm(conv: nn.Module, norm_layer: Callable[[int], nn.Module], num_channels: int) -> tuple[nn.Module, nn.Module]:
    """Build ``norm_layer(num_channels)`` for the output of ``conv`` and bind them (:func:`bind_norm`).

    Args:
        conv: the convolution.
        norm_layer: the backbone's norm factory.
        num_channels: ``conv``'s output channels.

    Returns:
        ``(conv to use, norm)``.
    """
    norm = norm_layer(num_channels)
    return bind_norm(conv, norm), norm


def relink_preceding_layers(model: nn.Module) -> None:
    """Bind every norm of ``model`` that holds its preceding layer (CBN: ``preceding_layer``) to the
    module registered just before it in its parent, keeping its state: after a copy that could not
    carry the link (stacking and unstacking models, :mod:`mbn.models.stack`).

    Args:
        model: the model; its norms are re-bound in place.
    """
    for parent in model.modules():
        previous = None
        for child in parent.children():
            if previous is not None and hasattr(child, "preceding_layer"):
                child.bind_preceding(previous)
            previous = child
