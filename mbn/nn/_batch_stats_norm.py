"""The base of the layers that normalize with batch statistics: MomentumBatchNorm and BatchRenorm."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.nn._input_checks import check_input, check_training_batch
from mbn.nn.evonorm_b0 import EvoNormB0
from mbn.utils.library_internals import own_buffers

# torch's batch-norm layers, named by their public classes (their common base, ``_BatchNorm``, is
# private); tests/nn/test_convert.py checks that every batch-norm class of torch.nn is here.
TORCH_BATCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)
# Input ranks each variant accepts, by the rank its name gives (1d, 2d, 3d), as nn.BatchNorm*d.
_INPUT_DIMS: dict[int, tuple[int, ...]] = {1: (2, 3), 2: (4,), 3: (5,)}


def min_values_per_channel(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """The fewest values per channel that a batch-statistics norm layer of ``model`` (``nn.BatchNorm*``,
    MBN, Batch Renorm, EvoNorm-B0) sees for one input of ``input_shape``: its smallest feature map's size.

    A training batch of ``m`` inputs gives such a layer ``m`` times that many values per channel;
    one value has no variance (torch raises "Expected more than 1 value per channel when training").
    Runs one forward pass in eval mode without gradients (the model is left as it was).

    Args:
        model: the network.
        input_shape: one input without the batch dimension, e.g. ``(3, 32, 32)``.

    Returns:
        The smallest feature map's number of values per channel; None without such layers.
    """
    layers = [m for m in model.modules() if isinstance(m, (*TORCH_BATCH_NORMS, BatchStatsNorm, EvoNormB0))]
    seen: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: seen.append(args[0][0].numel() // args[0].shape[1]))
             for layer in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return min(seen) if seen else None


class BatchStatsNorm(nn.Module):
    """What MBN and Batch Renorm share with ``nn.BatchNorm`` and with each other.

    The affine ``weight``/``bias``, the ``running_mean``/``running_var``/``num_batches_tracked``
    buffers under ``nn.BatchNorm``'s names (so BN state_dicts load, very old ones without
    ``num_batches_tracked`` too), the input checks, the eval forward (exactly ``nn.BatchNorm`` with
    the running statistics), counting training steps, and resetting. A subclass adds its own
    training forward (:meth:`_normalize_training_batch`), its own buffers
    (:meth:`_reset_own_buffers`), and the Python state its forward reads instead of a buffer
    (:meth:`_sync_with_buffers`).

    The 1d/2d/3d variants name their rank in the class statement,
    ``class MomentumBatchNorm2d(MomentumBatchNorm, input_rank=2)``, which allows the input ranks of
    ``nn.BatchNorm2d``; the base classes accept any rank >= 2.

    Deliberately not a ``torch.nn.modules.batchnorm._BatchNorm`` subclass: Lightning's
    ``sync_batchnorm=True`` (``nn.SyncBatchNorm.convert_sync_batchnorm``) would silently replace it
    with plain synchronized BN. These layers normalize each device's own batch.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances before the square root.
        affine: learn a per-channel scale and shift.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
    """

    _input_dims: tuple[int, ...] = ()  # allowed input ranks; empty = any rank >= 2

    def __init_subclass__(cls, input_rank: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if input_rank is not None:
            cls._input_dims = _INPUT_DIMS[input_rank]

    def __init__(self, num_features: int, eps: float, affine: bool, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = affine

        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)``; see the class docstring of the layer."""
        check_input(self, input, self._input_dims)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        check_training_batch(self, input)
        output = self._normalize_training_batch(input)
        own_buffers(self)["num_batches_tracked"].add_(1)  # direct access: this runs for every layer at every step
        return output

    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        """The training-mode output for a checked input; updates the statistics buffers."""
        raise NotImplementedError

    # -- state --------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Reset the running statistics, ``num_batches_tracked`` and the layer's own statistics."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self._reset_own_buffers()
        self._sync_with_buffers()

    def reset_parameters(self) -> None:
        """Reset the statistics and the affine parameters to ``weight = 1``, ``bias = 0``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _reset_own_buffers(self) -> None:
        """Reset the buffers a subclass adds to nn.BatchNorm's (none here)."""

    def _sync_with_buffers(self) -> None:
        """Re-derive the Python copies of buffer state that forward reads (none here).

        Forward never reads a tensor into Python: that would sync the device at every step and
        break torch.compile's graph. So a subclass keeps such state (MBN: are ``M``/``Phi``
        initialized; Batch Renorm: the step count) in Python, updates it in forward, and derives it
        here from the buffers after they change wholesale (reset, state_dict loading).
        """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "num_batches_tracked" not in state_dict:  # very old BN checkpoints
            state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._sync_with_buffers()
