"""Swap the normalization layers of an existing model (e.g. a torchvision resnet, or MBN -> BN)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mbn.nn._batch_stats_norm import TORCH_BATCH_NORMS
from mbn.nn.activation import drop_activations, includes_activation
from mbn.nn.batch_renorm import BatchRenorm, BatchRenorm1d, BatchRenorm3d
from mbn.nn.cross_iteration_batchnorm import CrossIterationBatchNorm, CrossIterationBatchNorm1d, CrossIterationBatchNorm3d
from mbn.nn.factory import check_kwargs, norm_class
from mbn.nn.filter_response_norm import FilterResponseNorm
from mbn.nn.momentum_batchnorm import MomentumBatchNorm, MomentumBatchNorm1d, MomentumBatchNorm3d
from mbn.nn.moving_average_batchnorm import MovingAverageBatchNorm, MovingAverageBatchNorm1d, MovingAverageBatchNorm3d
from mbn.nn.preceding_layer import bind_norm, needs_preceding_layer

__all__ = ["convert_norm", "convert"]

# Layers with batch statistics that convert_norm replaces.
# Targets whose eps is added to another statistic than a batch variance (FRN: the mean square):
# they keep their own (their paper's) default instead of inheriting the old layer's.
_OWN_EPS = (FilterResponseNorm,)
_CONVERTIBLE = (*TORCH_BATCH_NORMS, MomentumBatchNorm, BatchRenorm, MovingAverageBatchNorm, CrossIterationBatchNorm)
_DIM_1 = (nn.BatchNorm1d, MomentumBatchNorm1d, BatchRenorm1d, MovingAverageBatchNorm1d, CrossIterationBatchNorm1d)
_DIM_3 = (nn.BatchNorm3d, MomentumBatchNorm3d, BatchRenorm3d, MovingAverageBatchNorm3d, CrossIterationBatchNorm3d)


def _input_rank(layer: nn.Module) -> int:
    if isinstance(layer, _DIM_1):
        return 1
    if isinstance(layer, _DIM_3):
        return 3
    return 2  # the 2d classes, and rank-agnostic ones such as SyncBatchNorm


def _replacement(layer: nn.Module, name: str, kwargs: dict[str, Any]) -> nn.Module:
    cls = norm_class(name, _input_rank(layer))
    if cls is nn.Identity:
        return nn.Identity()
    accepted = inspect.signature(cls.__init__).parameters
    # Inherit what eval outputs depend on, unless overridden.
    inherited = {arg: getattr(layer, arg) for arg in ("eps", "affine") if arg in accepted and arg not in kwargs}
    if issubclass(cls, _OWN_EPS):
        inherited.pop("eps", None)
    new = cls(layer.num_features, **inherited, **kwargs)
    tensors = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
    floating = next((t for t in tensors if t.is_floating_point()), None)
    if floating is not None:
        new.to(device=floating.device, dtype=floating.dtype)
    # Copy every state entry the new layer also has (affine parameters, running statistics,
    # num_batches_tracked, MBN's momentum statistics); MBN re-initializes what is missing.
    target = new.state_dict()
    shared = {k: v for k, v in layer.state_dict().items() if k in target and target[k].shape == v.shape}
    new.load_state_dict(shared, strict=False)
    for param_name, param in new.named_parameters(recurse=False):
        old = getattr(layer, param_name, None)
        if isinstance(old, torch.Tensor):
            param.requires_grad_(old.requires_grad)
    new.train(layer.training)
    return new


def convert_norm(model: nn.Module, name: str, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm-like layer of ``model`` by the ``name`` normalization.

    Replaced: ``nn.BatchNorm1d/2d/3d`` (any of torch's batch norms, incl. ``SyncBatchNorm``, treated as
    2d), :class:`MomentumBatchNorm` and :class:`BatchRenorm` layers, each by the variant of the
    same input rank. The new layer inherits ``eps`` and ``affine`` (unless given in ``kwargs``),
    device, dtype, train/eval mode, ``requires_grad``, and copies every state entry it shares
    with the old one: affine parameters, running statistics, ``num_batches_tracked``. So MBN/BRN ->
    ``"bn"`` gives identical eval outputs (deployment without overhead), and BN -> ``"mbn"``
    starts from the BN's running statistics (MBN's momentum statistics initialize from the next
    batch). BN -> ``"evonorm_b0"`` keeps ``weight``, ``bias`` and ``running_var``; ``"evonorm_s0"`` and
    ``"frn"`` keep ``weight`` and ``bias`` (FRN keeps its own ``eps`` default, 1e-6, as its eps is added
    to a mean square). GroupNorm and Identity layers are left alone.

    A target that needs the layer in front of it (``"mabn"`` centers that convolution, ``"cbn"``
    compensates for its weight's change; :func:`mbn.nn.bind_norm`) gets the module registered
    directly before the replaced layer in the same parent (torchvision's and :mod:`mbn.models`'
    ``conv1, bn1, ...`` order), which must then have a weight with the layer's channel count. A
    converted model keeps its centered convolutions (so ``"mabn"`` -> ``"bn"`` keeps eval outputs).

    Normalization-activation targets (``"evonorm_b0"``, ``"evonorm_s0"``, ``"frn"``) replace the
    BN-ReLU pair, so their ReLU must go; which ReLU follows which norm is in the model's forward
    code, which this cannot read. After converting, :func:`~mbn.nn.drop_activations` replaces every
    ``nn.ReLU`` that directly follows a converted layer inside an ``nn.Sequential`` by
    ``nn.Identity``, and turns off the activation of the norms a module lists in
    ``norms_before_addition``. The backbones of :mod:`mbn.models` (ResNet, VGG) are then exactly
    the models ``norm_layer`` builds (their blocks skip the ReLU after such a norm in their
    forward). In any other model (e.g. a torchvision ResNet, whose forward calls ``self.relu``
    after ``self.bn1``) ReLUs outside ``nn.Sequential`` stay and every converted layer keeps its
    activation: convert such a model and then fix its activations by hand.

    Args:
        model: the model; modified in place.
        name: target norm, one of :data:`mbn.nn.NORM_NAMES`.
        **kwargs: constructor arguments of the target layer (as for :func:`mbn.nn.make_norm`).

    Returns:
        ``model`` (or the new layer if ``model`` itself is a converted layer).

    Raises:
        ValueError: unknown name.
        TypeError: a keyword the target layer does not accept.
        ValueError: a ``"mabn"``/``"cbn"`` layer without such a layer directly in front of it.
    """
    check_kwargs(name, kwargs)
    converted = _convert(model, name, kwargs)
    if includes_activation(norm_class(name)):
        drop_activations(converted)
    return converted


def _convert(model: nn.Module, name: str, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(model, _CONVERTIBLE):
        return _replacement(model, name, kwargs)
    previous: tuple[str, nn.Module] | None = None
    for child_name, child in list(model.named_children()):
        converted = _convert(child, name, kwargs)
        if converted is not child:
            setattr(model, child_name, converted)
            if needs_preceding_layer(converted):
                _bind_previous(model, child_name, converted, previous)
        previous = (child_name, converted)
    return model


def _bind_previous(parent: nn.Module, norm_name: str, norm: nn.Module, previous: tuple[str, nn.Module] | None) -> None:
    weight = None if previous is None else getattr(previous[1], "weight", None)
    if previous is None or not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.shape[0] != norm.num_features:
        before = "nothing" if previous is None else f"{previous[0]!r} ({type(previous[1]).__name__})"
        raise ValueError(f"convert_norm: {type(norm).__name__} {norm_name!r} needs the convolution in front of it, but "
                         f"{before} is registered before it in {type(parent).__name__}; bind it with mbn.nn.bind_norm(conv, norm)")
    setattr(parent, previous[0], bind_norm(previous[1], norm))


def convert(model: nn.Module, to: str = "bn", **kwargs: Any) -> nn.Module:
    """Convert a trained model's normalization layers, by default to plain ``nn.BatchNorm``.

    ``convert(model)`` turns every MBN/BRN layer into ``nn.BatchNorm1d/2d/3d`` with identical eval
    outputs (zero inference overhead; a plain torchvision-style checkpoint). Same as
    ``convert_norm(model, to, **kwargs)``.

    Args:
        model: the model; modified in place.
        to: target norm name.
        **kwargs: constructor arguments of the target layer.

    Returns:
        The converted model.
    """
    return convert_norm(model, to, **kwargs)
