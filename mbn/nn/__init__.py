"""Normalization layers for the small-batch study: MBN, Batch Renorm, GroupNorm, BN, none, and the
small-batch peers EvoNorm-B0/S0, FRN, MABN and CBN.

Pure PyTorch (no Lightning, no Hydra), so ``from mbn.nn import MomentumBatchNorm2d`` works in any
model. Backbones take ``norm_layer("mbn", ideal_batch_size=32)``; the training loop calls
``set_progress(model, epoch, total_epochs)`` to drive the MBN schedule (:mod:`mbn.nn.schedule`).
"""

from mbn.nn import schedule
from mbn.nn._batch_stats_norm import min_values_per_channel
from mbn.nn.activation import drop_activations, includes_activation, without_activation
from mbn.nn.batch_renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from mbn.nn.centered_conv import CenteredConv1d, CenteredConv2d, CenteredConv3d, centered
from mbn.nn.convert import convert, convert_norm
from mbn.nn.evonorm_b0 import EvoNormB0
from mbn.nn.evonorm_s0 import EvoNormS0
from mbn.nn.cross_iteration_batchnorm import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    cross_iteration_batch_norm,
)
from mbn.nn.factory import NORM_NAMES, make_norm, norm_class, norm_layer
from mbn.nn.filter_response_norm import FilterResponseNorm
from mbn.nn.functional import momentum_batch_norm, momentum_batch_norm_reference
from mbn.nn.group_norm import GroupNorm
from mbn.nn.momentum_batchnorm import (
    MomentumBatchNorm,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
    mbn_layers,
    set_progress,
)
from mbn.nn.moving_average_batchnorm import (
    MovingAverageBatchNorm,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)
from mbn.nn.preceding_layer import bind_norm, conv_norm, needs_preceding_layer

__all__ = [
    "NORM_NAMES",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "GroupNorm",
    "MomentumBatchNorm",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "bind_norm",
    "centered",
    "conv_norm",
    "convert",
    "convert_norm",
    "cross_iteration_batch_norm",
    "drop_activations",
    "includes_activation",
    "make_norm",
    "mbn_layers",
    "min_values_per_channel",
    "momentum_batch_norm",
    "momentum_batch_norm_reference",
    "needs_preceding_layer",
    "norm_class",
    "norm_layer",
    "schedule",
    "set_progress",
    "without_activation",
]
