"""Build normalization layers by name: the ``norm_layer`` factory that backbones take."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from mbn.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from mbn.nn.evonorm_b0 import EvoNormB0
from mbn.nn.evonorm_s0 import EvoNormS0
from mbn.nn.filter_response_norm import FilterResponseNorm
from mbn.nn.cross_iteration_batchnorm import CrossIterationBatchNorm1d, CrossIterationBatchNorm2d, CrossIterationBatchNorm3d
from mbn.nn.group_norm import GroupNorm
from mbn.nn.momentum_batchnorm import MomentumBatchNorm1d, MomentumBatchNorm2d, MomentumBatchNorm3d
from mbn.nn.moving_average_batchnorm import MovingAverageBatchNorm1d, MovingAverageBatchNorm2d, MovingAverageBatchNorm3d

__all__ = ["NORM_LAYERS", "NORM_NAMES", "make_norm", "norm_layer", "norm_class"]

# The norm layers by name: the layer class per input rank (1 = (N, C[, L]), 2 = images, 3 = volumes).
# A new norm is one entry here (its config schema: mbn.train.spec.NORM_SCHEMAS; tests keep the names equal).
NORM_LAYERS: dict[str, dict[int, type[nn.Module]]] = {
    "bn": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "gn": {1: GroupNorm, 2: GroupNorm, 3: GroupNorm},
    "brn": {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
    "mbn": {1: MomentumBatchNorm1d, 2: MomentumBatchNorm2d, 3: MomentumBatchNorm3d},
    "evonorm_b0": {1: EvoNormB0, 2: EvoNormB0, 3: EvoNormB0},
    "evonorm_s0": {1: EvoNormS0, 2: EvoNormS0, 3: EvoNormS0},
    "frn": {1: FilterResponseNorm, 2: FilterResponseNorm, 3: FilterResponseNorm},
    "mabn": {1: MovingAverageBatchNorm1d, 2: MovingAverageBatchNorm2d, 3: MovingAverageBatchNorm3d},
    "cbn": {1: CrossIterationBatchNorm1d, 2: CrossIterationBatchNorm2d, 3: CrossIterationBatchNorm3d},
    "none": {1: nn.Identity, 2: nn.Identity, 3: nn.Identity},
}
NORM_NAMES: tuple[str, ...] = tuple(NORM_LAYERS)


def norm_class(name: str, dim: int = 2) -> type[nn.Module]:
    """The layer class for ``name`` and spatial rank ``dim``.

    Args:
        name: one of :data:`NORM_NAMES`.
        dim: 1 for ``(N, C)``/``(N, C, L)``, 2 for ``(N, C, H, W)``, 3 for ``(N, C, D, H, W)`` inputs.

    Returns:
        The class (``nn.Identity`` for ``"none"``).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or dim.
    """
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(NORM_NAMES)}")
    if dim not in (1, 2, 3):
        raise ValueError(f"norm dim must be 1, 2 or 3, got {dim!r}")
    return NORM_LAYERS[name][dim]


def _accepted_kwargs(cls: type[nn.Module]) -> tuple[str, ...]:
    if cls is nn.Identity:  # accepts and ignores anything: a typo would vanish silently
        return ()
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, channel count
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_kwargs(name: str, kwargs: dict[str, Any], dim: int = 2) -> None:
    """Raise if ``kwargs`` contains an argument the ``name`` layer does not accept.

    Args:
        name: one of :data:`NORM_NAMES`.
        kwargs: keyword arguments meant for the layer constructor.
        dim: spatial rank, as in :func:`norm_class`.

    Raises:
        ValueError: unknown name.
        TypeError: an unaccepted keyword (the message names the norm, the keyword and the accepted ones).
    """
    accepted = _accepted_kwargs(norm_class(name, dim))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"norm {name!r} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )


def make_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build a 2d normalization layer by name.

    Args:
        name: ``"bn"`` (``nn.BatchNorm2d``), ``"gn"`` (:class:`GroupNorm`), ``"brn"``
            (:class:`BatchRenorm2d`), ``"mbn"`` (:class:`MomentumBatchNorm2d`), ``"none"``
            (``nn.Identity``, takes no keyword arguments), ``"evonorm_b0"`` (:class:`EvoNormB0`),
            ``"evonorm_s0"`` (:class:`EvoNormS0`) or ``"frn"`` (:class:`FilterResponseNorm`).
        num_features: channel count.
        **kwargs: constructor arguments of that layer, e.g. mbn: ``ideal_batch_size``, ``tau0``,
            ``schedule``, ``fixed_lam``, ``eps``; gn: ``num_groups`` or ``group_size``; brn:
            ``r_max``, ``d_max``, ``warmup_steps``, ``r_max_ramp_steps``, ``d_max_ramp_steps``, ``momentum``;
            evonorm_b0: ``eps``, ``momentum``; evonorm_s0: ``num_groups`` or ``group_size``, ``eps``; frn: ``eps``.
            mabn (:class:`MovingAverageBatchNorm2d`): ``window``, ``momentum``, ``grad_momentum``,
            ``warmup_steps``, ``r_max``, ``renorm_warmup_steps``; cbn (:class:`CrossIterationBatchNorm2d`):
            ``window``, ``burnin_steps``, ``momentum``. MABN and CBN need the convolution in front of
            them (:func:`mbn.nn.bind_norm`; the backbones of :mod:`mbn.models` hand it over).

    Returns:
        The layer.

    Raises:
        ValueError: unknown name (lists the valid ones) or an invalid value.
        TypeError: a keyword the layer does not accept (names the norm and the keyword).
    """
    check_kwargs(name, kwargs)
    cls = norm_class(name)
    if cls is nn.Identity:
        return nn.Identity()
    return cls(num_features, **kwargs)


def norm_layer(name: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    """A ``norm_layer(num_features)`` callable for backbones (the torchvision convention).

    The name and keyword names are checked now, so config typos fail before any model is built.

    Args:
        name: one of :data:`NORM_NAMES`.
        **kwargs: constructor arguments, as in :func:`make_norm`.

    Returns:
        A picklable callable ``num_features -> nn.Module``.

    Raises:
        ValueError: unknown name.
        TypeError: a keyword the layer does not accept.
    """
    check_kwargs(name, kwargs)
    return functools.partial(make_norm, name, **kwargs)
