"""Stacked runs: K runs of one architecture that differ only in their seed, trained as one model.

Runs with the same architecture, data, schedule and batch size can share every operation:
:func:`stack` puts them side by side along the channel dimension (every layer becomes its
:mod:`~mbn.models.stacked_layers` counterpart), so one step pays the per-operation overhead once
for K runs. No operation combines two runs' channels and SGD is elementwise, so with the sum of
the K runs' losses (:func:`~mbn.models.stacked_loss.member_cross_entropy`) each member trains
exactly as its single run would (tested to 1e-9 in float64).

A member is interchangeable with a single run: :func:`member_state_dict` has the single model's
keys and loads strictly into ``build_model(...)``, :func:`load_member_state_dict` takes a single
run's state_dict, and :func:`unstack` gives back ordinary models.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from mbn.models.resnet import BasicBlock, Bottleneck, ResNet
from mbn.models.stacked_layers import STACKED_LAYERS, StackedConv2d, StackedLayer
from mbn.models.vgg import VGG
from mbn.nn.preceding_layer import relink_preceding_layers

__all__ = [
    "StackedModel",
    "load_member_model",
    "load_member_state_dict",
    "member_model",
    "member_state_dict",
    "set_conv_paths",
    "stack",
    "stacked_modules",
    "unstack",
]

# Containers whose forward only chains children, adds residuals and flattens (N, C, 1, 1)
# features: each keeps the channel layout of stacked runs. Exact classes, as a subclass's forward may not.
_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, ResNet, VGG, BasicBlock, Bottleneck)
# Parameter-free layers that act on each channel alone, so they serve stacked runs unchanged.
_CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


class StackedModel(nn.Module):
    """K runs of one architecture as one module; built by :func:`stack`.

    ``forward`` takes ``(m, K * c, H, W)``, where channels ``[k * c, (k + 1) * c)`` are run k's
    images (``c`` image channels per run; :class:`~mbn.data.StackedBatchLoader` yields this
    layout), and returns logits ``(m, K, num_classes)``, ``[:, k]`` being run k's.

    ``body`` has the member model's module tree and names, each layer with parameters replaced by
    its stacked counterpart, so ``mbn.nn.set_progress(stacked, epoch, total_epochs)`` drives every
    member's MBN schedule.

    Args:
        body: the stacked module tree.
        num_members: K.
        member_in_channels: image channels per run, ``c`` (None skips the input check).
    """

    def __init__(self, body: nn.Module, num_members: int, member_in_channels: int | None) -> None:
        super().__init__()
        self.body = body
        self.num_members = num_members
        self.member_in_channels = member_in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(m, K, num_classes)`` of input ``(m, K * c, H, W)``."""
        if self.member_in_channels is not None and (x.dim() < 2 or x.shape[1] != self.num_members * self.member_in_channels):
            raise ValueError(
                f"StackedModel of {self.num_members} members with {self.member_in_channels} input channels each: "
                f"expected input of shape (m, {self.num_members * self.member_in_channels}, ...), got {tuple(x.shape)}"
            )
        return self.body(x).unflatten(1, (self.num_members, -1))

    def extra_repr(self) -> str:
        return f"members={self.num_members}"


def stack(models: Sequence[nn.Module]) -> StackedModel:
    """Stack K models of one architecture into one that trains them side by side.

    Member k starts as an exact copy of ``models[k]``: its parameters, buffers and Python state
    (e.g. MBN's schedule progress). Build the K single models as their runs would (seed, then
    ``build_model``), then stack them. The models are not modified.

    Stackable: ``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``, ``nn.GroupNorm`` and
    :class:`mbn.nn.GroupNorm`, :class:`~mbn.nn.MomentumBatchNorm2d`,
    :class:`~mbn.nn.BatchRenorm2d`, :class:`~mbn.nn.EvoNormB0`, :class:`~mbn.nn.EvoNormS0`,
    :class:`~mbn.nn.FilterResponseNorm`, :class:`~mbn.nn.MovingAverageBatchNorm2d`,
    :class:`~mbn.nn.CrossIterationBatchNorm2d`, :class:`~mbn.nn.CenteredConv2d`, inside
    ``nn.Sequential``, :class:`~mbn.models.ResNet`,
    :class:`~mbn.models.VGG` and their blocks, with parameter-free channelwise layers (ReLU,
    pooling, Identity), and :class:`~mbn.nn.CrossIterationBatchNorm2d` (its members at one step):
    every model :func:`~mbn.models.build_model` builds, with every norm.

    Args:
        models: K >= 1 models of identical architecture and configuration.

    Returns:
        The stacked model, in model 0's train/eval mode, on its device and dtype.

    Raises:
        TypeError: an entry that is not an ``nn.Module``.
        ValueError: no models, models that differ (architecture, shapes, hyperparameters, dtype,
            device, mode), or a module that cannot be stacked; the message names the module.
    """
    models = list(models)
    if not models:
        raise ValueError("stack needs at least one model")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"stack takes nn.Module models; entry {index} is a {type(model).__name__}")
    reference = models[0]
    trees = [dict(model.named_modules()) for model in models]
    for index, tree in enumerate(trees[1:], 1):
        if list(tree) != list(trees[0]):
            differing = sorted(set(tree) ^ set(trees[0]))
            raise ValueError(f"model {index} has another architecture than model 0: modules {differing[:3]} are in only one of them")
    stacked_layers: dict[int, StackedLayer] = {}
    for name, module in trees[0].items():
        label = repr(name) if name else f"the model ({type(module).__name__})"
        for index, tree in enumerate(trees[1:], 1):
            if type(tree[name]) is not type(module):
                raise ValueError(f"cannot stack {label}: {type(tree[name]).__name__} in model {index}, {type(module).__name__} in model 0")
        kind = type(module)
        if kind in STACKED_LAYERS:
            try:
                stacked_layers[id(module)] = STACKED_LAYERS[kind].from_members([tree[name] for tree in trees])
            except ValueError as error:
                raise ValueError(f"cannot stack {label}: {error}") from None
        elif kind in _CONTAINERS or kind in _CHANNELWISE:
            own = [key for key, _ in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))]
            if own:
                raise ValueError(f"cannot stack {label}: {kind.__name__} has its own parameters/buffers {own}")
        else:
            known = ", ".join(cls.__name__ for cls in (*STACKED_LAYERS, *_CONTAINERS, *_CHANNELWISE))
            raise ValueError(f"cannot stack {label}: {kind.__qualname__} is not a module stack() knows ({known})")
    # The deepcopy memo substitutes the stacked layers; everything else left holds no tensors.
    body = copy.deepcopy(reference, memo=dict(stacked_layers))
    relink_preceding_layers(body)  # CBN's link to its convolution: now the stacked one
    first_conv = next((module for module in body.modules() if isinstance(module, StackedConv2d)), None)
    member_in_channels = None if first_conv is None else first_conv.in_channels // len(models)
    return StackedModel(body, len(models), member_in_channels)


def stacked_modules(stacked: StackedModel) -> list[tuple[str, StackedLayer]]:
    """The stacked layers of ``stacked``, named as in the member model, in module order.

    Args:
        stacked: a model from :func:`stack`.

    Returns:
        ``(name, layer)`` pairs.
    """
    _check_stacked(stacked)
    return [(name, module) for name, module in stacked.body.named_modules() if isinstance(module, StackedLayer)]


def set_conv_paths(stacked: StackedModel, paths: str | Mapping[str, str]) -> None:
    """Set how each stacked convolution computes (:attr:`StackedConv2d.path`); the numbers do not change.

    Args:
        stacked: a model from :func:`stack`.
        paths: one path for every convolution, or paths by layer name (as :func:`stacked_modules`
            names them); convolutions left out keep theirs.

    Raises:
        ValueError: a name that is no stacked convolution of ``stacked``, or an unknown path.
    """
    convs = {name: layer for name, layer in stacked_modules(stacked) if isinstance(layer, StackedConv2d)}
    chosen = dict.fromkeys(convs, paths) if isinstance(paths, str) else dict(paths)
    unknown = sorted(set(chosen) - set(convs))
    if unknown:
        raise ValueError(f"no stacked convolution named {', '.join(map(repr, unknown))}; the model has {', '.join(convs)}")
    for name, path in chosen.items():
        convs[name].path = path


def member_model(stacked: StackedModel, k: int) -> nn.Module:
    """Member ``k`` as an ordinary model: copies of its tensors and Python state, its classes.

    Args:
        stacked: a model from :func:`stack`.
        k: member index.

    Returns:
        A model like the one stacked as member ``k``, in the stacked model's mode.
    """
    layers = stacked_modules(stacked)
    _check_index(stacked, k)
    model = copy.deepcopy(stacked.body, memo={id(layer): layer.member(k) for _, layer in layers})
    relink_preceding_layers(model)  # CBN's link to its convolution: now member k's
    return model


def unstack(stacked: StackedModel) -> list[nn.Module]:
    """All members as ordinary models (``unstack(stack(models))`` equals ``models``).

    Args:
        stacked: a model from :func:`stack`.

    Returns:
        K models.
    """
    return [member_model(stacked, k) for k in range(stacked.num_members)]


def load_member_model(stacked: StackedModel, k: int, model: nn.Module) -> None:
    """Make member ``k`` a copy of ``model`` (tensors and Python state), e.g. a single run's model.

    Args:
        stacked: a model from :func:`stack`.
        k: member index.
        model: a model of the members' architecture and configuration.

    Raises:
        ValueError: ``model`` lacks a stacked layer or has another kind there (names the module).
    """
    _check_index(stacked, k)
    pairs = []
    for name, layer in stacked_modules(stacked):  # check everything first: no half-loaded member
        try:
            source = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"cannot load member {k}: the model has no module {name!r}") from None
        mismatch = layer.member_mismatch(k, source)
        if mismatch is not None:
            raise ValueError(f"cannot load member {k} at {name!r}: {mismatch}")
        pairs.append((layer, source))
    for layer, source in pairs:
        layer.load_member(k, source)


def member_state_dict(stacked: StackedModel, k: int) -> dict[str, Tensor]:
    """Member ``k``'s state_dict: the keys, shapes and metadata of the single model's state_dict.

    Args:
        stacked: a model from :func:`stack`.
        k: member index.

    Returns:
        A state_dict that loads with ``strict=True`` into the single-run model (copies, not views).
    """
    return member_model(stacked, k).state_dict()


def load_member_state_dict(
    stacked: StackedModel, k: int, state_dict: Mapping[str, Any], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load a single run's state_dict into member ``k``, as ``load_state_dict`` into its model would.

    The single layers' own loading rules apply (e.g. MBN from a plain-BN state_dict re-initializes
    its momentum statistics from the next batch, for member ``k`` only). Python state that is not
    in a state_dict (MBN's schedule progress) stays member ``k``'s.

    Args:
        stacked: a model from :func:`stack`.
        k: member index.
        state_dict: a state_dict of the member model.
        strict: as for ``nn.Module.load_state_dict``.

    Returns:
        The missing and unexpected keys, as ``load_state_dict`` returns them (a named tuple, whose
        class torch does not export).
    """
    model = member_model(stacked, k)
    result = model.load_state_dict(state_dict, strict=strict)
    load_member_model(stacked, k, model)
    return result


def _check_stacked(stacked: Any) -> None:
    if not isinstance(stacked, StackedModel):
        raise TypeError(f"expected a StackedModel (from mbn.models.stack), got {type(stacked).__name__}")


def _check_index(stacked: StackedModel, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < stacked.num_members:
        raise ValueError(f"member index must be an int in [0, {stacked.num_members}), got {k!r}")
