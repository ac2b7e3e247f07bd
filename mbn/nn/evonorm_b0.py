"""EvoNorm-B0 (Liu, Brock, Simonyan & Le, NeurIPS 2020), with the channel count first.

A normalization-activation layer: it replaces a BatchNorm-ReLU pair (the paper's method). The
backbones drop the ReLU after it and build the norm before a residual addition with
``apply_act=False`` (:mod:`mbn.nn.activation`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mbn.nn._input_checks import check_input, check_number, check_training_batch
from mbn.nn.activation import NormActivation

__all__ = ["EvoNormB0"]


class EvoNormB0(NormActivation, nn.Module):
    """EvoNorm-B0 (Liu et al., 2020, Table 1), batch-dependent; for inputs ``(N, C, *)`` of any rank >= 2.

    Per channel ``c``, with ``s2_batch`` the biased variance over ``(N, *spatial)`` and ``s2_inst``
    the biased variance of each sample's channel over ``*spatial``:

        y = x / max(sqrt(s2_batch + eps), v * x + sqrt(s2_inst + eps)) * weight + bias

    In training ``s2_batch`` is this batch's and ``running_var`` is updated as ``nn.BatchNorm``'s
    (``momentum``, unbiased variance); in eval mode ``s2_batch`` is ``running_var``. For ``(N, C)``
    inputs a sample's channel is one value, so ``s2_inst = 0``. ``v``, ``weight`` and ``bias`` are per
    channel, initialized to 1, 1 and 0 (the paper's TF reference code). The state is
    ``weight``, ``bias``, ``v`` and the ``running_var`` buffer (no running mean: B0 never subtracts one);
    ``weight``, ``bias`` and ``running_var`` load from a BatchNorm state_dict (``convert_norm``).

    Without its activation (``apply_act=False``, for a norm before a residual addition) the layer is
    ``y = x * weight + bias``, with no ``v``: the definition of timm's ``EvoNorm2dB0`` and of the
    authors' reference code (``nonlinearity=False``), which normalize nothing there. ``running_var``
    stays (and stays untouched), so BatchNorm state_dicts still load.

    DDP: the batch variance is each device's own (as ``nn.BatchNorm`` without SyncBatchNorm; not a
    ``_BatchNorm``, so ``convert_sync_batchnorm`` leaves it alone); the instance variance is per
    sample. ``running_var`` is a buffer, so DDP's buffer broadcast gives every device rank 0's at
    each forward, as it does BN's running statistics.

    Args:
        num_features: number of channels ``C``.
        eps: added to both variances before the square root.
        momentum: running-variance momentum (PyTorch convention: weight of the new batch), in [0, 1].
        apply_act: include the activation (the max with ``v * x + sqrt(s2_inst + eps)``); see above.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
    """

    activation_parameter = "v"
    activation_init = 1.0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        apply_act: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_affine_and_activation(num_features, eps, apply_act, factory)
        self.momentum = check_number(type(self).__name__, "momentum", momentum, 0.0, 1.0)
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)``; see the class docstring."""
        check_input(self, input, ())
        shape = (1, -1) + (1,) * (input.dim() - 2)  # a per-channel vector against (N, C, *)
        if self.v is None:  # apply_act=False
            return torch.addcmul(self.bias.view(shape), input, self.weight.view(shape))
        spatial = tuple(range(2, input.dim()))
        if self.training:
            check_training_batch(self, input)
            batch_var = torch.var(input, dim=(0, *spatial), correction=0)
            with torch.no_grad():
                count = input.numel() // self.num_features
                unbiased = batch_var.detach() * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            batch_var = self.running_var.to(input.dtype)
        batch_std = torch.sqrt(batch_var + self.eps).view(shape)
        if spatial:
            instance_std = torch.sqrt(torch.var(input, dim=spatial, correction=0, keepdim=True) + self.eps)
        else:
            instance_std = math.sqrt(self.eps)
        denominator = torch.maximum(batch_std, input * self.v.view(shape) + instance_std)
        return torch.addcmul(self.bias.view(shape), input / denominator, self.weight.view(shape))

    def reset_running_stats(self) -> None:
        """Reset ``running_var`` to 1."""
        self.running_var.fill_(1)

    def reset_parameters(self) -> None:
        """Reset ``running_var`` and the parameters to ``weight = v = 1``, ``bias = 0``."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        if self.v is not None:
            nn.init.ones_(self.v)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, apply_act={self.apply_act}"
