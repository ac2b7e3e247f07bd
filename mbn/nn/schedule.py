"""The MBN momentum schedule as pure functions (Yong et al., ECCV 2020, Sec. 3).

``lam(t, T, m, m0)`` is the momentum of the training statistics at (1-based) epoch ``t`` of ``T``:

    rho    = min(m / m0, 1) ** (1 / T)
    lam(t) = rho ** (T / (T - 1) * max(T - t, 0)) - rho ** T

so ``lam = 0`` in epoch 1 (plain BN), ``lam = 1 - m / m0`` from epoch ``T`` on, and ``lam = 0`` at
every epoch when ``m >= m0``. ``tau(m, m0, tau0) = tau0 ** (m / m0)`` is the momentum of the
inference (running) statistics.

Both zeros are exactly ``0.0``, not a rounding residue: the layers take the native BN path only for
``lam == 0``. ``lam`` computes the same value without ``rho`` (``ratio = min(m / m0, 1) = rho ** T``):

    lam(t) = ratio ** ((T - t) / (T - 1)) - ratio

At ``t = 1`` the exponent is ``(T - 1) / (T - 1) == 1.0``, so this is ``ratio - ratio``; for
``m >= m0`` it is ``1.0 - 1.0``. (Rounding ``rho`` first, as the paper writes it, leaves up to
~6e-15 at ``t = 1``, and at the other epochs an error that grows with ``T``: 5e-14 at ``T = 1000``.)

Edge cases have a defined, tested meaning instead of a ZeroDivisionError or NaN:

* ``T == 1``: the only epoch is the last one, so ``lam = 1 - min(m / m0, 1)`` (the limit of the
  formula at ``t = T``; the ``T / (T - 1)`` factor multiplies ``max(T - t, 0) = 0``).
* ``t > T`` (training past the schedule): ``max(T - t, 0)`` holds lam at its final value.
* ``t < 1``, ``T < 1``, ``m < 1``, ``m0 < 1``, non-finite values, ``tau0`` outside [0, 1]:
  ``ValueError`` naming the argument and the value (``t`` is 1-based; a 0-based epoch is a bug).

``t`` may be fractional: the per-iteration schedule passes ``epoch + batch_idx / num_batches``.
"""

from __future__ import annotations

import math

SCHEDULES: tuple[str, ...] = ("epoch", "iteration", "fixed")


def _checked(name: str, value: float, minimum: float, maximum: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(number) or number < minimum or (maximum is not None and number > maximum):
        bounds = f">= {minimum:g}" if maximum is None else f"in [{minimum:g}, {maximum:g}]"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


def check_progress(t: float, T: float) -> tuple[float, float]:
    """Validate a schedule position: 1-based epoch ``t`` (may be fractional) out of ``T`` epochs.

    Args:
        t: current epoch, 1-based (``epoch + batch_idx / num_batches`` for per-iteration progress).
        T: total number of epochs, ``>= 1``.

    Returns:
        ``(t, T)`` as floats.

    Raises:
        ValueError: ``t < 1``, ``T < 1`` or a non-finite value.
    """
    return _checked("t (1-based epoch)", t, 1.0), _checked("T (total epochs)", T, 1.0)


def lam(t: float, T: float, m: float, m0: float = 32) -> float:
    """Momentum ``lambda`` of the MBN training statistics at epoch ``t`` of ``T``.

    Args:
        t: current epoch, 1-based; fractional values give the per-iteration schedule.
        T: total number of epochs (``>= 1``).
        m: number of samples in the normalized batch (per device), ``>= 1``.
        m0: ideal batch size, ``>= 1`` (paper default 32).

    Returns:
        lambda in ``[0, 1 - min(m / m0, 1)]``; see the module docstring for the edge cases.
    """
    t, T = check_progress(t, T)
    m = _checked("m (batch size)", m, 1.0)
    m0 = _checked("m0 (ideal batch size)", m0, 1.0)
    ratio = min(m / m0, 1.0)  # == rho ** T
    final = 1.0 - ratio
    if t >= T:  # also covers T == 1, where T / (T - 1) would divide by zero
        return final
    # rho ** (T / (T - 1) * (T - t)) == ratio ** ((T - t) / (T - 1)): no rho, so t = 1 gives
    # ratio ** 1.0 - ratio == 0.0 exactly (see the module docstring).
    value = ratio ** ((T - t) / (T - 1.0)) - ratio
    # The exact value lies in [0, final]; the clamp guards against a last-bit rounding of pow.
    return min(max(value, 0.0), final)


def tau(m: float, m0: float = 32, tau0: float = 0.9) -> float:
    """Momentum ``tau = tau0 ** (m / m0)`` of the inference (running) statistics.

    ``running <- tau * running + (1 - tau) * batch_stat``; PyTorch's BN ``momentum`` is ``1 - tau``.

    Args:
        m: number of samples in the normalized batch, ``>= 1``.
        m0: ideal batch size, ``>= 1``.
        tau0: momentum at the ideal batch size, in ``[0, 1]``.

    Returns:
        tau in ``[0, 1]``.
    """
    m = _checked("m (batch size)", m, 1.0)
    m0 = _checked("m0 (ideal batch size)", m0, 1.0)
    tau0 = _checked("tau0", tau0, 0.0, 1.0)
    return tau0 ** (m / m0)
