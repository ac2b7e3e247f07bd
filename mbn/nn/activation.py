"""Normalization-activation layers: which layers include their activation, and how models drop the ReLU.

EvoNorm-B0/S0 (Liu et al., 2020) and FRN + TLU (Singh & Krishnan, 2020) replace a BatchNorm-ReLU
pair; where a norm's output is added to a residual (ResNet's last norm of a block, the shortcut's
norm) the original networks have no activation, and these layers run without theirs
(``apply_act=False``, as timm's ``evo_norm.py`` / ``filter_response_norm.py`` and the authors'
reference code). Backbones get their norm from ``norm_layer(num_channels)`` and ask the layer,
through :func:`includes_activation` / :func:`without_activation`, what to do around it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from mbn.nn._input_checks import check_num_features, check_number

__all__ = ["NormActivation", "drop_activations", "includes_activation", "without_activation"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class NormActivation:
    """Mixin of the normalization-activation layers: ``includes_activation`` and ``apply_act``.

    The activation's own parameter (EvoNorm's ``v``, TLU's ``tau``, named by
    ``activation_parameter``) exists only while ``apply_act`` is True, as in timm: a layer without
    its activation has no unused parameter (DDP, optimizers) and no such state_dict entry.
    """

    includes_activation = True
    activation_parameter: str
    activation_init: float

    def _init_affine_and_activation(self, num_features: int, eps: float, apply_act: bool, factory: dict[str, Any]) -> None:
        """Check and set ``num_features`` and ``eps``; create ``weight`` (1), ``bias`` (0) and, with ``apply_act``,
        the activation's parameter (``activation_init``): the state every such layer starts from."""
        name = type(self).__name__
        check_num_features(name, num_features)
        self.num_features = num_features
        self.eps = check_number(name, "eps", eps, 0.0)
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        setattr(self, self.activation_parameter, nn.Parameter(torch.full((num_features,), self.activation_init, **factory)))
        self.apply_act = apply_act

    @property
    def apply_act(self) -> bool:
        """Whether the layer applies its activation; setting it adds or removes the activation's parameter."""
        return getattr(self, self.activation_parameter) is not None

    @apply_act.setter
    def apply_act(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{type(self).__name__}: apply_act must be a bool, got {value!r}")
        if value == self.apply_act:
            return
        if not value:
            setattr(self, self.activation_parameter, None)
            return
        weight = self.weight  # type: ignore[attr-defined]
        setattr(self, self.activation_parameter, nn.Parameter(torch.full_like(weight.detach(), self.activation_init)))


def includes_activation(layer: nn.Module) -> bool:
    """Whether ``layer`` is a normalization-activation layer (then no ReLU should follow it).

    Args:
        layer: any module.
    """
    return bool(getattr(layer, "includes_activation", False))


def without_activation(layer: ModuleT) -> ModuleT:
    """``layer`` without its activation (``apply_act = False``) if it includes one; others unchanged.

    For a norm whose output is added to a residual, where the original network has no activation.

    Args:
        layer: any module; modified in place.

    Returns:
        ``layer``.
    """
    if includes_activation(layer):
        layer.apply_act = False  # type: ignore[attr-defined]
    return layer


def drop_activations(model: ModuleT) -> ModuleT:
    """Match the activations around ``model``'s normalization-activation layers to the original network.

    Two rules, both no-ops for models without such layers:

    * in every ``nn.Sequential``, an ``nn.ReLU`` directly after a layer that includes its
      activation becomes ``nn.Identity`` (same index, so state_dict keys keep their names);
    * every module that lists, in a ``norms_before_addition`` attribute, the paths of its norms
      whose output is added to a residual (e.g. ResNet's ``("norm2", "downsample.1")``) gets
      :func:`without_activation` on each of them that exists.

    Which ReLU follows which norm elsewhere is in a model's forward code, which this cannot read:
    such ReLUs stay (a model's forward can ask :func:`includes_activation` itself, as
    :class:`~mbn.models.ResNet`'s blocks do).

    Args:
        model: the model; modified in place.

    Returns:
        ``model``.
    """
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, before), (name, after) in zip(children, children[1:]):
                if includes_activation(before) and type(after) is nn.ReLU:
                    setattr(module, name, nn.Identity())
        for path in getattr(module, "norms_before_addition", ()):
            try:
                norm = module.get_submodule(path)
            except AttributeError:  # e.g. a block without a downsample
                continue
            without_activation(norm)
    return model
