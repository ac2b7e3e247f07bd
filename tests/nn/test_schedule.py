"""The MBN schedule functions against a hand-computed table, the formula, and their edge cases."""

import math
from decimal import Decimal, localcontext

import pytest

from mbn.nn import schedule

# T = 4, m0 = 32. With m / m0 = 2**-k: rho = 2**(-k/4), so
# lam(t) = rho**(4/3 * (4 - t)) - rho**4 = 2**(-k * (4 - t) / 3) - 2**-k.
# Entries written out by hand from that closed form (m = 2: k = 4, ..., m = 16: k = 1).
HAND_TABLE = {
    # m: (lam(1), lam(2), lam(3), lam(4))
    2: (0.0, 2 ** (-8 / 3) - 1 / 16, 2 ** (-4 / 3) - 1 / 16, 1 - 1 / 16),
    4: (0.0, 2 ** (-6 / 3) - 1 / 8, 2 ** (-3 / 3) - 1 / 8, 1 - 1 / 8),
    8: (0.0, 2 ** (-4 / 3) - 1 / 4, 2 ** (-2 / 3) - 1 / 4, 1 - 1 / 4),
    16: (0.0, 2 ** (-2 / 3) - 1 / 2, 2 ** (-1 / 3) - 1 / 2, 1 - 1 / 2),
    32: (0.0, 0.0, 0.0, 0.0),
    64: (0.0, 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("m", sorted(HAND_TABLE))
def test_lam_matches_hand_table(m):
    for t, expected in enumerate(HAND_TABLE[m], start=1):
        assert schedule.lam(t, 4, m, 32) == pytest.approx(expected, abs=1e-12), (m, t)


def test_hand_table_spot_values():
    # Two entries as decimals, so a wrong closed form above would show up too.
    assert schedule.lam(2, 4, 4, 32) == pytest.approx(0.125, abs=1e-12)  # 1/4 - 1/8
    assert schedule.lam(3, 4, 4, 32) == pytest.approx(0.375, abs=1e-12)  # 1/2 - 1/8


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_lam_general_properties(m):
    T = 10
    values = [schedule.lam(t, T, m, 32) for t in range(1, T + 1)]
    assert values[0] == 0.0  # epoch 1 is plain BN
    assert values[-1] == pytest.approx(1 - m / 32)  # last epoch
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly increasing
    # Fractional t (per-iteration schedule) lies between its neighbouring epochs.
    assert values[3] < schedule.lam(4.5, T, m, 32) < values[4]


def test_lam_is_zero_when_batch_reaches_ideal_size():
    for t in (1, 3, 10):
        assert schedule.lam(t, 10, 32, 32) == 0.0
        assert schedule.lam(t, 10, 100, 32) == 0.0


# Exact zeros, not approximate ones: the layers take the native BN path only for lam == 0.0. The
# paper's form (rho ** (T / (T - 1) * (T - t)) - rho ** T in floats) left 7e-18 .. 6e-15 at t = 1
# for many of these (e.g. 1.4e-17 for T = 6, m = 2; 4.0e-16 for T = 200, m = 2).
FIRST_EPOCH_TOTALS = [2, 3, 4, 6, 10, 90, 200, 300, 1000, 7.5]


@pytest.mark.parametrize("T", FIRST_EPOCH_TOTALS)
def test_lam_is_exactly_zero_in_the_first_epoch(T):
    for m0 in (7, 32, 128):
        for m in (1, 2, 3, 4, 5, 8, 16, 31, 100):
            assert schedule.lam(1, T, m, m0) == 0.0, (T, m, m0)  # also the per-iteration t of step 1


@pytest.mark.parametrize("T", [1, 2, 6, 10, 200])
def test_lam_is_exactly_zero_at_every_step_when_m_reaches_m0(T):
    steps = [1 + (T + 2) * k / 50 for k in range(51)]  # fractional epochs, past T too
    for m0 in (2, 7, 32):
        for m in (m0, m0 + 1, 4 * m0):
            assert all(schedule.lam(t, T, m, m0) == 0.0 for t in steps), (T, m, m0)


def paper_lam(t: float, T: float, m: float, m0: float) -> float:
    """The paper's formula (module docstring) in 50-digit decimal arithmetic."""
    with localcontext() as context:
        context.prec = 50
        t, T, m, m0 = (Decimal(value) for value in (t, T, m, m0))
        rho = min(m / m0, Decimal(1)) ** (1 / T)
        return float(rho ** (T / (T - 1) * max(T - t, Decimal(0))) - rho**T)


@pytest.mark.parametrize("T", [2, 4, 10, 90, 300])
def test_lam_matches_the_formula(T):
    for m in (1, 2, 3, 5, 8, 16, 31):
        for k in range(33):
            t = 1 + (T - 1) * k / 32
            assert schedule.lam(t, T, m, 32) == pytest.approx(paper_lam(t, T, m, 32), rel=0, abs=1e-15), (t, m)


def test_single_epoch_and_beyond_schedule_use_final_value():
    assert schedule.lam(1, 1, 8, 32) == pytest.approx(0.75)  # T = 1: the only epoch is the last
    assert schedule.lam(1.7, 1, 8, 32) == pytest.approx(0.75)
    assert schedule.lam(12, 10, 8, 32) == pytest.approx(0.75)  # t > T holds the final value


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"t": 0, "T": 10, "m": 2}, "t"),
        ({"t": 0.99, "T": 10, "m": 2}, "t"),
        ({"t": 1, "T": 0, "m": 2}, "T"),
        ({"t": 1, "T": 10, "m": 0}, "m"),
        ({"t": 1, "T": 10, "m": 0.5}, "m"),
        ({"t": 1, "T": 10, "m": 2, "m0": 0}, "m0"),
        ({"t": float("nan"), "T": 10, "m": 2}, "t"),
        ({"t": 1, "T": float("inf"), "m": 2}, "T"),
        ({"t": "one", "T": 10, "m": 2}, "t"),
    ],
)
def test_lam_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        schedule.lam(**kwargs)


def test_tau():
    assert schedule.tau(32, 32, 0.9) == pytest.approx(0.9)
    assert schedule.tau(2, 32, 0.9) == pytest.approx(0.9 ** (1 / 16))
    assert schedule.tau(64, 32, 0.9) == pytest.approx(0.81)
    assert schedule.tau(8, 32, 0.0) == 0.0
    for bad in ({"m": 0}, {"m": 2, "m0": 0.5}, {"m": 2, "tau0": 1.5}, {"m": 2, "tau0": -0.1}, {"m": math.nan}):
        with pytest.raises(ValueError):
            schedule.tau(**bad)


def test_check_progress():
    assert schedule.check_progress(3, 10) == (3.0, 10.0)
    with pytest.raises(ValueError, match="1-based"):
        schedule.check_progress(0, 10)
