"""Theorem 2: the regularization BN's batch-statistic noise adds to the loss, and where its expansion fails.

BN normalizes a sample with standardized value ``x = (x_raw - mu)/sigma`` to
``x_hat = (x + xi_mu) / sqrt(xi_sigma)``. With the noise of Theorem 1 for Gaussian data (``xi_mu ~ N(0, 1/m)``
independent of ``xi_sigma ~ chi2(m-1)/m``), write ``u = xi_sigma^(-1/2)`` and ``v = u - 1``, so
``x_hat = x + xi_mu + x v + xi_mu v``. A second-order Taylor expansion of the loss ``l`` around ``x`` gives::

    E[l(x_hat)] = l(x) + R_add(x) + R_mul(x) + R(x)
    R_add(x) = l''(x) / (2 m)                                   (noise on the mean)
    R_mul(x) = x l'(x) E[v] + x^2 l''(x) E[v^2] / 2              (noise on the variance)

and ``R`` is the remainder (third and higher order). The moments of ``u`` are exact::

    E[u]   = sqrt(m/2) Gamma((m-2)/2) / Gamma((m-1)/2)   finite for m >= 3, infinite for m = 2
    E[u^2] = E[1/xi_sigma] = m / (m - 3)                 finite for m >= 4, infinite for m <= 3

(chi2 with k = m-1 <= 2 degrees of freedom has infinite E[1/X]), and for large m
``E[v] = 5/(4m) + O(1/m^2)``, ``E[v^2] = 1/(2m) + O(1/m^2)``, so
``R_add + R_mul ~ [l''(x)/2 + 5 x l'(x)/4 + x^2 l''(x)/4] / m``.

The loss is the logistic loss of a correctly labelled logit, ``l(z) = log(1 + e^-z)``, with
``l'(z) = -sigmoid(-z)`` and ``l''(z) = sigmoid(z) sigmoid(-z)``. It grows linearly, so for m = 2, where
``E[u] = inf``, the left side itself is infinite: Monte Carlo does not converge there.

The left side is measured by Monte Carlo (float64, common random numbers across ``x``) and by
quadrature (reference, m >= 3). As a check of the model, the study also measures what BN really does
when ``x`` is itself one of the ``m`` samples of the batch ("in-batch"): then ``|x_hat| <= sqrt(m-1)``,
everything is finite, and for m = 2 ``x_hat = +-1`` exactly.

Command::

    python -m experiments.theory.theorem2 --out DIR [--samples N] [--quick]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import integrate, special, stats
from tqdm import tqdm

from experiments.theory.common import base_parser, positive_int, save_figure, write_csv, write_json

BATCH_SIZES: tuple[int, ...] = (2, 3, 4, 8, 16, 32, 64)
TABLE_X: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)

_CHUNK = 250_000


def loss(z: np.ndarray) -> np.ndarray:
    """Logistic loss of a correctly labelled logit: ``log(1 + exp(-z))`` (numerically stable)."""
    return np.logaddexp(0.0, -np.asarray(z, dtype=np.float64))


def loss_d1(z: np.ndarray) -> np.ndarray:
    """``l'(z) = -sigmoid(-z)``."""
    return -special.expit(-np.asarray(z, dtype=np.float64))


def loss_d2(z: np.ndarray) -> np.ndarray:
    """``l''(z) = sigmoid(z) sigmoid(-z)``."""
    z = np.asarray(z, dtype=np.float64)
    return special.expit(z) * special.expit(-z)


def inverse_sqrt_moments(m: int) -> tuple[float, float]:
    """Exact ``(E[u], E[u^2])`` for ``u = xi_sigma^(-1/2)``, ``xi_sigma ~ chi2(m-1)/m``; ``inf`` where infinite.

    Args:
        m: batch size (>= 2).
    """
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    first = (np.sqrt(m / 2.0) * np.exp(special.gammaln((m - 2) / 2.0) - special.gammaln((m - 1) / 2.0))
             if m >= 3 else np.inf)
    second = m / (m - 3.0) if m >= 4 else np.inf
    return float(first), float(second)


def expansion_terms(x: np.ndarray, m: int) -> dict[str, np.ndarray]:
    """Second-order expansion terms at ``x`` for batch size ``m``.

    Returns:
        ``R_add``, ``R_mul`` (exact moments of ``u``; ``inf`` where they diverge) and ``R_mul_asym`` (the
        ``1/m`` asymptotic moments ``E[v] = 5/(4m)``, ``E[v^2] = 1/(2m)``), each shaped like ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    mean_u, mean_u2 = inverse_sqrt_moments(m)
    mean_v = mean_u - 1.0
    mean_v2 = mean_u2 - 2.0 * mean_u + 1.0 if np.isfinite(mean_u2) else np.inf
    d1, d2 = loss_d1(x), loss_d2(x)
    with np.errstate(invalid="ignore"):
        r_mul = np.where(x == 0.0, 0.0, x * d1 * mean_v + 0.5 * x**2 * d2 * mean_v2)
    # x l'(x) < 0 for x > 0 while x^2 l'' > 0: inf - inf would be nan; the quadratic term dominates.
    r_mul = np.where(np.isnan(r_mul), np.inf, r_mul)
    return {
        "R_add": d2 / (2.0 * m),
        "R_mul": r_mul,
        "R_mul_asym": x * d1 * 5.0 / (4.0 * m) + x**2 * d2 / (4.0 * m),
    }


def _noise(m: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws of ``(xi_mu, xi_sigma)`` for Gaussian data."""
    return rng.standard_normal(n) / np.sqrt(m), rng.chisquare(m - 1, n) / m


def _in_batch_stats(m: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sum and sum of squares of the ``m - 1`` other (standard normal) samples of the batch."""
    others_mean = rng.standard_normal(n) / np.sqrt(m - 1)
    deviations = rng.chisquare(m - 2, n) if m > 2 else np.zeros(n)  # chi2(m-2), independent of the mean
    return (m - 1) * others_mean, deviations + (m - 1) * others_mean**2


def monte_carlo(xs: np.ndarray, m: int, samples: int, rng: np.random.Generator,
                in_batch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo mean and standard error of ``l(x_hat)`` at every ``x`` (common random numbers).

    Args:
        xs: standardized sample values.
        m: batch size.
        samples: Monte Carlo draws.
        rng: numpy generator.
        in_batch: ``x`` is one of the ``m`` samples (what BN does) instead of independent of the noise.

    Returns:
        ``(mean, standard_error)``, shaped like ``xs``. The standard error assumes a finite variance,
        which ``l(x_hat)`` has only for m >= 4 in the independent model.
    """
    xs = np.asarray(xs, dtype=np.float64)[:, None]
    total = np.zeros(xs.shape[0])
    total_sq = np.zeros(xs.shape[0])
    for start in range(0, samples, _CHUNK):
        n = min(_CHUNK, samples - start)
        if in_batch:
            s1, s2 = _in_batch_stats(m, n, rng)
            mean_b = (xs + s1) / m
            var_b = (xs**2 + s2) / m - mean_b**2
            x_hat = (xs - mean_b) / np.sqrt(var_b)
        else:
            xi_mu, xi_sigma = _noise(m, n, rng)
            x_hat = (xs + xi_mu) / np.sqrt(xi_sigma)
        values = loss(x_hat)
        total += values.sum(1)
        total_sq += np.square(values).sum(1)
    mean = total / samples
    var = np.maximum(total_sq / samples - mean**2, 0.0)
    return mean, np.sqrt(var / samples)


def quadrature(x: float, m: int, nodes: int = 200) -> float:
    """``E[l(x_hat)]`` in the independent-noise model by numerical integration (m >= 3).

    Inner integral over ``xi_mu`` by Gauss-Legendre on two panels split at the kink ``x + xi_mu = 0``
    (where ``l`` bends sharply when ``xi_sigma`` is small); outer over ``log chi2`` by adaptive quadrature.

    Args:
        x: standardized sample value.
        m: batch size (>= 3; for m = 2 the expectation is infinite).
        nodes: Gauss-Legendre nodes per panel.
    """
    if m < 3:
        raise ValueError(f"m must be >= 3 (E[l(x_hat)] is infinite for m = 2 with this loss), got {m}")
    k = m - 1
    t, w = np.polynomial.legendre.leggauss(nodes)
    kink = -x * np.sqrt(m)  # standard-normal value of xi_mu * sqrt(m) where x + xi_mu = 0
    panels = []
    for lo, hi in ((min(-12.0, kink - 1.0), kink), (kink, max(12.0, kink + 1.0))):
        half = 0.5 * (hi - lo)
        nodes_t = lo + half * (t + 1.0)
        panels.append((nodes_t, half * w * stats.norm.pdf(nodes_t)))
    z = np.concatenate([p[0] for p in panels]) / np.sqrt(m)
    weights = np.concatenate([p[1] for p in panels])

    def integrand(log_chi2: float) -> float:
        chi2_value = np.exp(log_chi2)
        inner = float(np.dot(weights, loss((x + z) / np.sqrt(chi2_value / m))))
        return stats.chi2.pdf(chi2_value, k) * chi2_value * inner

    dist = stats.chi2(k)
    lo, hi = np.log(dist.ppf(1e-15)), np.log(dist.isf(1e-15))
    value, _ = integrate.quad(integrand, lo, hi, limit=400, epsabs=1e-13, epsrel=1e-11)
    return float(value)


def running_mean(x: float, m: int, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Running Monte Carlo mean of ``l(x_hat)`` at log-spaced sample counts (shows divergence at m = 2)."""
    xi_mu, xi_sigma = _noise(m, samples, rng)
    cumulative = np.cumsum(loss((x + xi_mu) / np.sqrt(xi_sigma)))
    counts = np.unique(np.logspace(1, np.log10(samples), 60).astype(int))
    return counts, cumulative[counts - 1] / counts


# ----------------------------------------------------------------------------------------------------


def run(samples: int, seed: int, batch_sizes: Sequence[int] = BATCH_SIZES,
        xs: Sequence[float] = TABLE_X, curve_xs: np.ndarray | None = None) -> dict:
    """All numbers of the study: one row per ``(m, x)``, curves for the figures, running means.

    Args:
        samples: Monte Carlo draws per ``m``.
        seed: random seed.
        batch_sizes: the ``m`` values.
        xs: the ``x`` values of the table.
        curve_xs: fine ``x`` grid for the loss-vs-x curves (Monte Carlo only).
    """
    xs = np.asarray(xs, dtype=np.float64)
    curve_xs = np.linspace(-4.0, 4.0, 33) if curve_xs is None else np.asarray(curve_xs, dtype=np.float64)
    rows, curves = [], {}
    for index, m in enumerate(tqdm(batch_sizes, desc="theorem2", unit="m")):
        rng = np.random.default_rng([seed, index])
        mc, mc_se = monte_carlo(xs, m, samples, rng)
        in_batch, in_batch_se = monte_carlo(xs, m, samples, rng, in_batch=True)
        curve_mc, _ = monte_carlo(curve_xs, m, samples, rng)
        curve_in_batch, _ = monte_carlo(curve_xs, m, samples, rng, in_batch=True)
        curves[m] = {"mc": curve_mc.tolist(), "in_batch": curve_in_batch.tolist()}
        terms = expansion_terms(xs, m)
        mean_u, mean_u2 = inverse_sqrt_moments(m)
        for i, x in enumerate(xs):
            exact = quadrature(float(x), m) if m >= 3 else np.inf
            base = float(loss(x))
            second_order = float(terms["R_add"][i] + terms["R_mul"][i])
            rows.append({
                "m": m, "x": float(x), "loss": base,
                "E_u": mean_u, "E_u2": mean_u2,
                "mc": float(mc[i]), "mc_se": float(mc_se[i]),
                "quadrature": exact,
                "gap": exact - base,  # the regularization (inf for m = 2)
                "R_add": float(terms["R_add"][i]), "R_mul": float(terms["R_mul"][i]),
                "R_mul_asym": float(terms["R_mul_asym"][i]),
                "R": exact - base - second_order if np.isfinite(exact) and np.isfinite(second_order) else np.nan,
                "R_asym": exact - base - float(terms["R_add"][i] + terms["R_mul_asym"][i])
                if np.isfinite(exact) else np.nan,
                "in_batch": float(in_batch[i]), "in_batch_se": float(in_batch_se[i]),
                "in_batch_gap": float(in_batch[i]) - base,
            })
    rng = np.random.default_rng([seed, 10_000])
    divergence = {}
    for m in (2, 3, 4):
        counts, means = running_mean(0.0, m, max(samples, 1000), rng)
        divergence[m] = {"samples": counts.tolist(), "running_mean": means.tolist()}
    return {"rows": rows, "curve_x": curve_xs.tolist(), "curves": curves, "running_mean_x0": divergence,
            "samples": samples}


def plot(result: dict, path: Path) -> None:
    """Six panels: gap vs m, m * gap vs m, E[l] vs x, remainder vs m, in-batch vs model, m = 2 divergence."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = sorted({r["x"] for r in rows})
    ms = sorted({r["m"] for r in rows})
    colors = dict(zip(xs, plt.cm.coolwarm(np.linspace(0, 1, len(xs)))))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.6))
    (ax_gap, ax_scaled, ax_curve), (ax_rem, ax_batch, ax_div) = axes

    for x in xs:
        sub = [r for r in rows if r["x"] == x]
        m_arr = np.array([r["m"] for r in sub], dtype=float)
        gap = np.array([r["gap"] for r in sub])
        second = np.array([r["R_add"] + r["R_mul"] for r in sub])
        asym = np.array([r["R_add"] + r["R_mul_asym"] for r in sub])
        exact = np.array([np.isfinite(r["quadrature"]) for r in sub])
        ok = np.isfinite(second)
        color = colors[x]
        ax_gap.plot(m_arr[exact], gap[exact], "o-", color=color, label=f"x={x:g}")
        ax_gap.plot(m_arr[ok], second[ok], "x--", color=color, lw=0.8)
        ax_scaled.plot(m_arr[exact], m_arr[exact] * gap[exact], "o-", color=color, label=f"x={x:g}")
        ax_scaled.plot(m_arr[ok], m_arr[ok] * second[ok], "x--", color=color, lw=0.8)
        ax_scaled.axhline(m_arr[-1] * asym[-1], color=color, ls=":", lw=0.8)
        ax_batch.plot(m_arr[exact], m_arr[exact] * gap[exact], "o-", color=color, label=f"x={x:g}")
        ax_batch.plot(m_arr, m_arr * np.array([r["in_batch_gap"] for r in sub]), "s:", color=color)
        finite = [r for r in sub if np.isfinite(r["R"]) and abs(r["R_add"]) + abs(r["R_mul"]) > 0]
        ax_rem.plot([r["m"] for r in finite], [abs(r["R"]) / (abs(r["R_add"]) + abs(r["R_mul"])) for r in finite],
                    "o-", color=color, label=f"x={x:g}")
        finite = [r for r in sub if np.isfinite(r["R_asym"])]
        ax_rem.plot([r["m"] for r in finite],
                    [abs(r["R_asym"]) / (abs(r["R_add"]) + abs(r["R_mul_asym"])) for r in finite], "^:", color=color)
    ax_gap.axhline(0, color="k", lw=0.5)
    ax_gap.set_yscale("symlog", linthresh=1e-3)
    ax_gap.set(xscale="log", xlabel="batch size m", ylabel=r"gap $E[l(\hat x)] - l(x)$",
               title="regularization (o exact, x-- 2nd-order expansion)")
    ax_gap.legend(fontsize=7)
    ax_scaled.set(xscale="log", xlabel="batch size m", ylabel=r"$m \times$ gap",
                  title=r"$m\times$gap (dotted: the $1/m$ limit of the expansion)")
    ax_batch.set(xscale="log", xlabel="batch size m", ylabel=r"$m \times$ gap",
                 title="o independent noise (theorem), s: x inside its own batch")
    ax_rem.set(xscale="log", yscale="log", xlabel="batch size m", ylabel=r"$|R| / (|R_{add}| + |R_{mul}|)$",
               title="remainder: o exact moments of u, ^ 1/m moments")
    ax_rem.legend(fontsize=7)
    ax_batch.legend(fontsize=7)

    curve_x = np.array(result["curve_x"])
    ax_curve.plot(curve_x, loss(curve_x), "k", lw=2, label="l(x) (no noise)")
    shades = plt.cm.viridis(np.linspace(0, 0.9, len(ms)))
    for shade, m in zip(shades, ms):
        if m == 2:
            continue  # infinite expectation; the Monte Carlo value is meaningless
        ax_curve.plot(curve_x, result["curves"][m]["mc"], color=shade, label=f"m={m}")
    ax_curve.set(xlabel="standardized x", ylabel=r"$E[l(\hat x)]$ (Monte Carlo)", title="logistic loss under BN noise")
    ax_curve.legend(fontsize=7)

    for m, run_mean in result["running_mean_x0"].items():
        ax_div.plot(run_mean["samples"], run_mean["running_mean"], label=f"m={m}")
    ax_div.axhline(float(loss(0.0)), color="k", lw=0.5)
    ax_div.set(xscale="log", xlabel="Monte Carlo samples", ylabel=r"running mean of $l(\hat x)$ at x=0",
               title="m=2: E[l] is infinite, the mean keeps growing")
    ax_div.legend(fontsize=7)
    for ax in (ax_gap, ax_scaled, ax_rem, ax_batch):
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; returns the summary written to ``summary.json``."""
    parser = base_parser(__doc__.split("\n\n")[0], "theorem2")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="Monte Carlo draws per m (default 4000000; --quick: 50000)")
    args = parser.parse_args(argv)
    samples = args.samples or (50_000 if args.quick else 4_000_000)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = run(samples, args.seed)
    result["seconds"] = time.perf_counter() - started
    write_csv(out / "theorem2.csv", result["rows"])
    write_json(out / "summary.json", result)
    plot(result, out / "theorem2.png")
    print(f"{'m':>3} {'x':>5} {'l(x)':>7} {'E[l] quad':>10} {'E[l] MC':>10} {'+-':>8} {'gap':>9} {'R_add':>9} "
          f"{'R_mul':>9} {'R':>10} {'in-batch gap':>12}")
    for r in result["rows"]:
        print(f"{r['m']:>3} {r['x']:>5.1f} {r['loss']:>7.4f} {r['quadrature']:>10.5f} {r['mc']:>10.5f} "
              f"{r['mc_se']:>8.5f} {r['gap']:>9.5f} {r['R_add']:>9.5f} {r['R_mul']:>9.5f} {r['R']:>10.2e} "
              f"{r['in_batch_gap']:>12.5f}")
    print(f"done in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
