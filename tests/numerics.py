"""Tolerances of the numerical tests, each derived from one error model (stated here, sized per test).

Error model. Two computations of the same numbers that differ only in the order of their
floating-point operations (a stacked run and its single runs, compiled and eager code, another
thread count or machine: a float convolution's reduction order depends on both) round differently:
each result is off by a few units of the dtype's machine epsilon ``eps`` relative to the magnitudes summed
into it. A training step adds such a difference and the following steps carry it on, amplified by
the sensitivity of the trained state to a perturbation of one step. So after ``steps`` steps

    ||actual - expected||_F / ||expected||_F  <=  growth * steps * eps(dtype)

for each tensor, where ``growth`` bounds that amplification times the few ulps per step (each test
states its ``growth`` and why; 1 to 10 for a single pass of straight-line arithmetic). Norm-wise,
not element-wise: after 20 SGD steps an element near zero has a large relative error even when the
tensors agree to 1e-12 as wholes (issue 19), so element-wise tolerances fail on another machine.

A discrete metric (accuracy) is compared as a count of samples: a last-bit difference in the logits
flips the prediction of a sample whose top two logits are that close, so a test allows a stated
number of flipped samples instead of a relative tolerance on the fraction.

Exact equality (``torch.equal``) is for a computation compared with itself on one machine: the same
kernels on the same inputs (a resumed run and the uninterrupted one, a reload, a determinism check).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

Numbers = torch.Tensor | Sequence[float] | float

# The torch threads of the runs a test starts itself: one (tests/conftest.py), or the count
# `make test-threads` sets, which changes the reduction orders as another machine would.
TEST_THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))

# The growth of one pass of layer arithmetic (forward, backward, statistics update) computed in
# another order: a few roundings per element, times the conditioning of a normalization (dividing
# by a batch standard deviation, subtracting a mean). Measured at most 9 units of steps * eps (a
# BatchRenorm gradient against its naive reference) for the norm layers, compiled MBN and stacked
# logits in float64, with 1 and 2 threads; 1e3 leaves a margin of 100 and is still 2e-13 relative
# in float64, far below any real error (one sample of a batch wrong).
ONE_PASS_GROWTH = 1e3


def eps(dtype: torch.dtype) -> float:
    """The machine epsilon of ``dtype`` (2.2e-16 for float64, 1.2e-7 for float32)."""
    return torch.finfo(dtype).eps


def allowance(*, dtype: torch.dtype, steps: int, growth: float) -> float:
    """The allowed norm-wise relative error: ``growth * steps * eps(dtype)``.

    Args:
        dtype: the dtype the numbers were computed in.
        steps: training steps (or chained passes) between the common start and the comparison; >= 1.
        growth: amplification of one step's rounding difference (see the module docstring).
    """
    assert steps >= 1 and growth > 0, (steps, growth)
    return growth * steps * eps(dtype)


def normwise_error(actual: Numbers, expected: Numbers, scale: float = 0.0) -> float:
    """``||actual - expected||_F / max(||expected||_F, scale)`` in float64 (0 when equal, inf for NaNs).

    Args:
        actual: the numbers under test.
        expected: the numbers they must match.
        scale: a floor for the denominator (see :func:`assert_close_normwise`).
    """
    a = torch.as_tensor(actual, dtype=torch.float64).detach().cpu()
    e = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    difference = torch.linalg.vector_norm(a - e).item()
    scale = max(torch.linalg.vector_norm(e).item(), scale)
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0 else float("inf")


def assert_close_normwise(
    actual: Numbers | Mapping[str, torch.Tensor],
    expected: Numbers | Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    steps: int,
    growth: float,
    scale: float = 0.0,
    what: str = "",
) -> None:
    """Each tensor of ``actual`` within ``growth * steps * eps(dtype)`` of ``expected``, norm-wise.

    Args:
        actual: a tensor, a sequence of floats (one tensor), or a state dict (same keys in the same
            order; floating tensors compared norm-wise one by one, integer and bool ones exactly).
        expected: the same structure.
        dtype: the dtype both were computed in.
        steps: training steps between the common start and the comparison (1 for one pass).
        growth: amplification of one step's rounding difference, as the calling test states it.
        scale: a floor for ``||expected||_F``: rounding errors are relative to the size of the terms
            summed into a result, so where those cancel (the gradient of a bias that a following
            normalization makes irrelevant is zero up to rounding) the test passes that size (the
            norm of the whole gradient, say) instead of the result's.
        what: named in the failure message.
    """
    bound = allowance(dtype=dtype, steps=steps, growth=growth)
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and list(actual) == list(expected), f"{what}: keys differ"
        for key, value in expected.items():
            if value.is_floating_point():
                _assert_within(actual[key], value, bound, scale, f"{what} {key}".strip())
            else:
                assert torch.equal(actual[key], value), f"{what} {key}: {actual[key]} != {value}"
        return
    _assert_within(actual, expected, bound, scale, what)


def _assert_within(actual: Numbers, expected: Numbers, bound: float, scale: float, what: str) -> None:
    error = normwise_error(actual, expected, scale)
    assert error <= bound, f"{what}: norm-wise relative error {error:.3g} > allowed {bound:.3g}"


def assert_counts_close(actual: float, expected: float, *, samples: int, allowed: int, what: str = "") -> None:
    """Two fractions of ``samples`` (an accuracy) differ by at most ``allowed`` samples.

    Args:
        actual: a fraction of ``samples`` (0.3125 of 64 = 20 samples).
        expected: the same metric of the run compared with.
        samples: how many samples the fraction counts.
        allowed: how many samples may be predicted differently (the calling test says why).
        what: named in the failure message.
    """
    counts = []
    for fraction in (actual, expected):
        count = fraction * samples
        assert abs(count - round(count)) < 1e-3, f"{what}: {fraction} is not a fraction of {samples} samples"
        counts.append(round(count))
    assert abs(counts[0] - counts[1]) <= allowed, f"{what}: {counts[0]} vs {counts[1]} of {samples} samples (allowed {allowed})"


def assert_histories_close(
    actual: Sequence[Mapping[str, float]],
    expected: Sequence[Mapping[str, float]],
    *,
    steps_per_epoch: int,
    growth: float,
    train_samples: int,
    test_samples: int,
    allowed_flips: int,
    dtype: torch.dtype = torch.float32,
    val_samples: int | None = None,
) -> None:
    """Two runs' ``results.json`` histories: the same computation in another order (see the module docstring).

    Losses per column (all epochs as one vector) within ``growth * steps * eps(dtype)`` norm-wise, with
    ``steps`` all the training steps; accuracies as counts of samples per epoch, at most
    ``allowed_flips`` apart; the schedule (``lr``, ``lam``, ``tau``: Python arithmetic on the same
    epoch numbers) within ``ONE_PASS_GROWTH * eps(float64)``.

    Args:
        actual: the history of the run under test (rows with ``epoch``, losses, accuracies, schedule).
        expected: the history of the run it must match.
        steps_per_epoch: training steps per epoch.
        growth: amplification of one step's rounding difference, as the calling test states it.
        train_samples: samples ``train_acc1`` counts per epoch.
        test_samples: samples ``test_acc1`` and ``test_acc5`` count.
        allowed_flips: samples per epoch and accuracy that may be predicted differently.
        dtype: the dtype the runs trained in.
        val_samples: samples ``val_acc1`` and ``val_acc5`` count (the validation split's); None = the
            runs have no validation split (their ``val_*`` columns must be null).
    """
    assert [row["epoch"] for row in actual] == [row["epoch"] for row in expected]
    steps = steps_per_epoch * len(expected)
    evaluated = ("test",) if val_samples is None else ("test", "val")
    if val_samples is None:
        assert all(row.get(column) is None for row in (*actual, *expected) for column in ("val_loss", "val_acc1", "val_acc5"))
    for column in ("train_loss", *(f"{split}_loss" for split in evaluated)):
        assert_close_normwise([row[column] for row in actual], [row[column] for row in expected], dtype=dtype,
                              steps=steps, growth=growth, what=column)
    counted = [("train_acc1", train_samples), ("test_acc1", test_samples), ("test_acc5", test_samples)]
    if val_samples is not None:
        counted += [("val_acc1", val_samples), ("val_acc5", val_samples)]
    for column, samples in counted:
        for row, want in zip(actual, expected):
            if want.get(column) is not None:
                assert_counts_close(row[column], want[column], samples=samples, allowed=allowed_flips,
                                    what=f"{column} of epoch {want['epoch']}")
    for column in ("lr", "lam", "tau"):
        if column in expected[0]:
            values = [[row[column] for row in rows] for rows in (actual, expected)]
            if None in values[1]:
                assert values[0] == values[1], column
            else:
                assert_close_normwise(*values, dtype=torch.float64, steps=1, growth=ONE_PASS_GROWTH, what=column)
