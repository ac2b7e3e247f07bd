"""What MBN and Batch Renorm share through their base class: BN's state_dict, input ranks, reset."""

import pytest
import torch
from torch import nn

from numerics import ONE_PASS_GROWTH, assert_close_normwise

from mbn.nn import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    MomentumBatchNorm,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
)

C = 3
# (layer class, nn.BatchNorm of the same rank, an input it accepts)
VARIANTS = [
    (MomentumBatchNorm1d, nn.BatchNorm1d, (4, C)),
    (MomentumBatchNorm2d, nn.BatchNorm2d, (2, C, 3, 3)),
    (MomentumBatchNorm3d, nn.BatchNorm3d, (2, C, 2, 2, 2)),
    (BatchRenorm1d, nn.BatchNorm1d, (4, C, 2)),
    (BatchRenorm2d, nn.BatchNorm2d, (2, C, 3, 3)),
    (BatchRenorm3d, nn.BatchNorm3d, (2, C, 2, 2, 2)),
]
IDS = [cls.__name__ for cls, _, _ in VARIANTS]


@pytest.mark.parametrize("cls, bn_cls, shape", VARIANTS, ids=IDS)
def test_input_ranks_are_batchnorms(cls, bn_cls, shape):
    layer, bn = cls(C), bn_cls(C)
    for rank in range(2, 7):
        x = torch.randn(*shape[:2], *([2] * (rank - 2)))
        try:
            bn(x)
        except ValueError:
            with pytest.raises(ValueError, match=f"got {rank}D"):
                layer(x)
        else:
            assert layer(x).shape == x.shape
    for base in (MomentumBatchNorm, BatchRenorm):  # the base classes take any rank >= 2
        assert base(C)(torch.randn(2, C, 2, 2, 2, 2)).shape == (2, C, 2, 2, 2, 2)


@pytest.mark.parametrize("cls, bn_cls, shape", VARIANTS, ids=IDS)
def test_state_dict_starts_with_batchnorms_keys(cls, bn_cls, shape):
    keys = list(cls(C).state_dict())
    bn_keys = list(bn_cls(C).state_dict())
    assert keys[: len(bn_keys)] == bn_keys
    assert keys[len(bn_keys):] == (["momentum_mean", "momentum_var", "momentum_initialized"] if issubclass(cls, MomentumBatchNorm) else [])


@pytest.mark.parametrize("cls, bn_cls, shape", VARIANTS, ids=IDS)
def test_very_old_batchnorm_checkpoint_loads_strict(cls, bn_cls, shape):
    bn = bn_cls(C)
    bn(torch.randn(shape) * 2 + 1)
    state = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}  # before PyTorch 0.4.1
    layer = cls(C)
    layer(torch.randn(shape))
    layer.load_state_dict(state, strict=True)
    assert int(layer.num_batches_tracked) == 0
    for key in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(layer, key), getattr(bn, key)), key
    layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 1


def test_reset_restarts_the_batch_renorm_ramp():
    # Step 0 of the ramp has r_max = 1, d_max = 0: exactly BN. After a reset the layer is there again.
    layer = BatchRenorm2d(C, r_max_ramp_steps=2, d_max_ramp_steps=2).double()
    bn = nn.BatchNorm2d(C).double()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        layer(torch.randn(2, C, 3, 3, generator=gen, dtype=torch.float64) * 3 + 2)
    layer.reset_parameters()
    x = torch.randn(2, C, 3, 3, generator=gen, dtype=torch.float64) * 3 + 2
    # Another order of the same float64 arithmetic: one pass, norm-wise (tests/numerics.py).
    assert_close_normwise(layer(x), bn(x), dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH)
    assert int(layer.num_batches_tracked) == 1
