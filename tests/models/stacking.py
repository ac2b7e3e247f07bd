"""Helpers of the stacked-run tests: K single runs and their stack, trained side by side on the same batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mbn.models import build_model, member_cross_entropy, member_state_dict
from mbn.nn import norm_layer, set_progress
from numerics import assert_close_normwise

NORMS = ("bn", "gn", "brn", "mbn", "none", "evonorm_b0", "evonorm_s0", "frn")
# Width-4 channels (4..32) split into 2 groups (GN, EvoNorm-S0: member k's groups must not straddle
# into member k+1's channels); BRN ramps within a few steps so its clipping moves.
NORM_KWARGS = {
    "gn": {"num_groups": 2},
    "evonorm_s0": {"num_groups": 2},
    "brn": {"warmup_steps": 2, "r_max_ramp_steps": 5, "d_max_ramp_steps": 5},
    "mbn": {"ideal_batch_size": 32},
    # MABN past its warmup and renormalization warmup within the tests' steps, its window full.
    "mabn": {"window": 3, "warmup_steps": 2, "renorm_warmup_steps": 4, "r_max": 1.5},
    # CBN past its burn-in within the tests' steps, its window full.
    "cbn": {"window": 3, "burnin_steps": 2},
}
NUM_CLASSES = 5
# SGD as the runs use it: momentum and weight decay make every parameter move at every step.
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
# A stack and its single runs, trained side by side at batch size 8, agree per tensor within
# TRAINING_GROWTH * steps * eps(float64), norm-wise (tests/numerics.py): measured at most 3.2e3 units
# of steps * eps (SGD momentum buffers of ResNet-18 with BN after 20 steps, 2 threads; 1.1e3 with one
# thread), so 1e5 (4.4e-10 after 20 steps) leaves a margin of 30 for other machines.
TRAINING_GROWTH = 1e5


def build(name: str, norm: str, seed: int, width: int = 4) -> nn.Module:
    """The single-run model of ``seed``, in float64."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=NUM_CLASSES, norm_layer=norm_layer(norm, **NORM_KWARGS.get(norm, {})), width=width)
    return model.double()


def image_size(name: str) -> int:
    return 32 if name.startswith("imagenet_") else 8


def batches(num_members: int, batch_size: int, size: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One batch per member: float64 images ``(m, 3, size, size)`` and labels ``(m,)``."""
    images = [torch.randn(batch_size, 3, size, size, generator=generator, dtype=torch.float64) for _ in range(num_members)]
    labels = [torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator) for _ in range(num_members)]
    return images, labels


def single_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def stacked_step(stacked: nn.Module, optimizer: torch.optim.Optimizer, images: list[torch.Tensor], labels: list[torch.Tensor]) -> list[float]:
    optimizer.zero_grad(set_to_none=True)
    losses = member_cross_entropy(stacked(torch.cat(images, 1)), torch.stack(labels, 1))
    losses.sum().backward()
    optimizer.step()
    return losses.tolist()


def set_all_progress(models: list[nn.Module], step: int) -> None:
    # A new epoch every 4 steps: MBN's "epoch" schedule has lam > 0 from step 4 on at m < m0.
    for model in models:
        set_progress(model, 1 + step / 4, 5)


def assert_state_dicts_equal(actual: dict, expected: dict, what: str = "", equal_nan: bool = False) -> None:
    """Same keys in the same order and bit-identical tensors: for a state compared with itself on one machine
    (a round trip, a frozen member), where the same kernels ran on the same inputs."""
    assert list(actual) == list(expected), what
    for key, value in expected.items():
        assert torch.equal(actual[key], value) or (
            equal_nan and value.is_floating_point() and torch.allclose(actual[key], value, rtol=0, atol=0, equal_nan=True)
        ), f"{what} {key}: {actual[key]} != {value}"


def assert_members_match(
    stacked: nn.Module, singles: list[nn.Module], *, steps: int, growth: float, skip: tuple[int, ...] = ()
) -> None:
    """Each member's state dict within ``growth * steps * eps(float64)`` of its single run's, tensor by tensor
    norm-wise (tests/numerics.py); integer buffers equal."""
    for k, single in enumerate(singles):
        if k not in skip:
            assert_close_normwise(member_state_dict(stacked, k), single.state_dict(), dtype=torch.float64,
                                  steps=steps, growth=growth, what=f"member {k}")
