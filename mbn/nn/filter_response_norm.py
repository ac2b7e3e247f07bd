"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, CVPR 2020), channel count first.

FRN + TLU is a normalization-activation layer: it replaces a BatchNorm-ReLU pair (the paper's
method). The backbones drop the ReLU after it and build the norm before a residual addition with
``apply_act=False`` (:mod:`mbn.nn.activation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mbn.nn._input_checks import check_input
from mbn.nn.activation import NormActivation

__all__ = ["FilterResponseNorm"]


class FilterResponseNorm(NormActivation, nn.Module):
    """FRN + TLU (Singh & Krishnan, 2020, Eqs. 1-4), batch-independent; for inputs ``(N, C, *)`` of any rank >= 2.

    Per sample and channel, with ``nu2`` the mean of ``x ** 2`` over the spatial positions (for
    ``(N, C)`` inputs, ``x ** 2`` itself):

        x_hat = x / sqrt(nu2 + eps),  y = max(weight * x_hat + bias, tau)

    No mean is subtracted. ``weight``, ``bias`` and ``tau`` are per channel, initialized to 1, 0
    and 0 (so at initialization TLU is a ReLU of the normalized input). Train and eval mode compute
    the same; there is no running state. ``eps`` is fixed (the paper's learned eps for 1x1
    activation maps is not implemented).

    Without its activation (``apply_act=False``, for a norm before a residual addition) the layer is
    FRN alone, ``y = weight * x_hat + bias``, with no ``tau``: timm's ``FilterResponseNormTlu2d``
    with ``apply_act=False``.

    DDP: no statistics across samples, so nothing is per device.

    Args:
        num_features: number of channels ``C``.
        eps: added to ``nu2`` before the square root (the paper's 1e-6).
        apply_act: include the TLU; see above.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    activation_parameter = "tau"
    activation_init = 0.0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        apply_act: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_affine_and_activation(num_features, eps, apply_act, {"device": device, "dtype": dtype})

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *)`` and threshold it; see the class docstring."""
        check_input(self, input, ())
        shape = (1, -1) + (1,) * (input.dim() - 2)  # a per-channel vector against (N, C, *)
        spatial = tuple(range(2, input.dim()))
        nu2 = input.square().mean(dim=spatial, keepdim=True) if spatial else input.square()
        x_hat = input * torch.rsqrt(nu2 + self.eps)
        normalized = torch.addcmul(self.bias.view(shape), x_hat, self.weight.view(shape))
        if self.tau is None:  # apply_act=False
            return normalized
        return torch.maximum(normalized, self.tau.view(shape))

    def reset_parameters(self) -> None:
        """Reset the parameters to ``weight = 1``, ``bias = tau = 0``."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, apply_act={self.apply_act}"
