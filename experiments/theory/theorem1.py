"""Theorem 1: the noise in BN's batch statistics, measured against its predicted distributions.

For a batch of ``m`` i.i.d. samples of one neuron with population mean ``mu`` and std ``sigma``, BN uses
the batch mean ``mu_B`` and the biased (1/m) batch variance ``sigma_B^2``. The paper writes them as noisy
versions of the population statistics::

    xi_mu    = (mu - mu_B) / sigma        ~ N(0, 1/m)             (exact for Gaussian data)
    xi_sigma = sigma_B^2 / sigma^2        ~ chi2(m - 1) / m       (exact for Gaussian data)

and its proof ends with ``xi_sigma -> N(1, kappa/m)`` for data of kurtosis ``kappa``. For any i.i.d. data
the exact variance is ``Var(xi_sigma) = (m-1) ((m-1) kappa - (m-3)) / m^3 = (kappa-1)/m + O(1/m^2)``
(Gaussian: ``2 (m-1)/m^2``), so this study measures which of ``kappa/m`` and ``(kappa-1)/m`` holds.

Data: Gaussian, Laplace (kappa 6), Student-t with 10 dof (kappa 4) and, with ``--real-archive``, the
inputs of one BN layer of a CIFAR-10 ResNet-18 (see :mod:`experiments.theory.activations`).

Command::

    python -m experiments.theory.theorem1 --out DIR [--batches N] [--quick] [--real-archive PATH]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats
from tqdm import tqdm

from experiments.theory.common import base_parser, positive_int, save_figure, write_csv, write_json

BATCH_SIZES: tuple[int, ...] = (2, 4, 8, 16, 32, 64)

# Kurtosis E[(x-mu)^4]/sigma^4 (not excess) of each synthetic distribution.
KURTOSIS: dict[str, float] = {"gaussian": 3.0, "laplace": 6.0, "student_t10": 3.0 + 6.0 / (10 - 4)}

# Rows of batches drawn per chunk: bounds memory at (chunk * m) float64 values.
_CHUNK = 50_000


def sample_standardized(distribution: str, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw float64 samples with population mean 0 and variance 1.

    Args:
        distribution: ``"gaussian"``, ``"laplace"`` or ``"student_t10"`` (a key of :data:`KURTOSIS`).
        size: output shape.
        rng: numpy random generator.
    """
    if distribution == "gaussian":
        return rng.standard_normal(size)
    if distribution == "laplace":
        return rng.laplace(0.0, 1.0 / np.sqrt(2.0), size)  # Var = 2 b^2
    if distribution == "student_t10":
        dof = 10.0
        return rng.standard_t(dof, size) * np.sqrt((dof - 2.0) / dof)  # Var = dof / (dof - 2)
    raise ValueError(f"distribution must be one of {sorted(KURTOSIS)}, got {distribution!r}")


def batch_noise(batches: np.ndarray, mean: np.ndarray | float = 0.0,
                std: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """BN's noise on the mean and variance for each batch.

    Args:
        batches: ``(B, m, ...)`` values; axis 1 is the batch, trailing axes are independent neurons.
        mean: population mean per neuron (broadcasts against ``batches[:, 0]``).
        std: population std per neuron.

    Returns:
        ``(xi_mu, xi_sigma)``, each ``(B, ...)``: ``(mean - mu_B)/std`` and ``sigma_B^2/std^2`` with the biased
        (1/m) batch variance, as BN normalizes with.
    """
    if batches.ndim < 2 or batches.shape[1] < 2:
        raise ValueError(f"batches must be (B, m, ...) with m >= 2, got shape {batches.shape}")
    batch_mean = batches.mean(axis=1)
    batch_var = batches.var(axis=1)
    return (mean - batch_mean) / std, batch_var / np.square(std)


def var_xi_sigma_exact(m: int, kurtosis: float) -> float:
    """Exact ``Var(sigma_B^2/sigma^2)`` of the biased batch variance of ``m`` i.i.d. samples.

    ``((m-1)/m)^2 (kappa/m - (m-3)/(m(m-1)))``, the classical variance of the unbiased sample variance
    rescaled by ``((m-1)/m)^2``. For large ``m`` it is ``(kappa-1)/m``; for Gaussian data ``2 (m-1)/m^2``.

    Args:
        m: batch size (>= 2).
        kurtosis: kurtosis ``kappa`` of the data (3 for a Gaussian).
    """
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    return (m - 1) * ((m - 1) * kurtosis - (m - 3)) / m**3


def _var_with_se(values: np.ndarray) -> tuple[float, float]:
    """Sample variance and its standard error ``sqrt((mu4 - var^2)/n)`` (no Gaussian assumption)."""
    centered = values - values.mean()
    var = float(np.mean(centered**2))
    mu4 = float(np.mean(centered**4))
    return var, float(np.sqrt(max(mu4 - var**2, 0.0) / values.size))


def summarize(xi_mu: np.ndarray, xi_sigma: np.ndarray, m: int, kurtosis: float) -> dict[str, float]:
    """Key numbers of one ``(data, m)`` cell: variances vs predictions and KS distances.

    Args:
        xi_mu: 1-D samples of ``xi_mu``.
        xi_sigma: 1-D samples of ``xi_sigma`` (same batches).
        m: batch size.
        kurtosis: the data's kurtosis (population value for real data).
    """
    var_mu, var_mu_se = _var_with_se(xi_mu)
    var_sigma, var_sigma_se = _var_with_se(xi_sigma)
    n = xi_mu.size
    return {
        "m": m,
        "kurtosis": kurtosis,
        "batches": n,
        # xi_mu vs N(0, 1/m)
        "var_mu_ratio": var_mu * m,  # measured / predicted 1/m
        "var_mu_ratio_se": var_mu_se * m,
        "ks_mu_normal": float(stats.kstest(xi_mu * np.sqrt(m), "norm").statistic),
        # xi_sigma vs chi2(m-1)/m and the normal limits
        "mean_sigma": float(xi_sigma.mean()),  # (m-1)/m for any data: the biased variance
        "m_var_sigma": var_sigma * m,  # -> kappa - 1 (measured); the paper's last step says kappa
        "m_var_sigma_se": var_sigma_se * m,
        "var_sigma_ratio_chi2": var_sigma / (2.0 * (m - 1) / m**2),
        "var_sigma_ratio_exact": var_sigma / var_xi_sigma_exact(m, kurtosis),
        "ks_sigma_chi2": float(stats.kstest(xi_sigma * m, stats.chi2(m - 1).cdf).statistic),
        "ks_sigma_normal_kappa_minus_1": float(
            stats.kstest(xi_sigma, stats.norm(1.0, np.sqrt((kurtosis - 1.0) / m)).cdf).statistic),
        "ks_sigma_normal_kappa": float(
            stats.kstest(xi_sigma, stats.norm(1.0, np.sqrt(kurtosis / m)).cdf).statistic),
    }


def synthetic_noise(distribution: str, m: int, batches: int, rng: np.random.Generator,
                    chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``xi_mu``, ``xi_sigma`` of ``batches`` i.i.d. batches of ``m`` standardized samples (float64)."""
    xi_mu, xi_sigma = [], []
    for start in range(0, batches, chunk):
        rows = min(chunk, batches - start)
        mu, sig = batch_noise(sample_standardized(distribution, (rows, m), rng))
        xi_mu.append(mu)
        xi_sigma.append(sig)
    return np.concatenate(xi_mu), np.concatenate(xi_sigma)


@dataclass
class CellSamples:
    """Samples kept for the QQ plots of one ``(data, m)`` cell (pooled over neurons for real data)."""

    data: str
    m: int
    xi_mu: np.ndarray
    xi_sigma: np.ndarray


def run_synthetic(batches: int, seed: int, batch_sizes: Sequence[int] = BATCH_SIZES,
                  distributions: Sequence[str] = tuple(KURTOSIS)) -> tuple[list[dict], list[CellSamples]]:
    """Theorem 1 on i.i.d. synthetic data: one summary row per ``(distribution, m)``.

    Args:
        batches: batches drawn per cell.
        seed: random seed (each cell gets its own stream, so cells are reproducible one by one).
        batch_sizes: the ``m`` values.
        distributions: keys of :data:`KURTOSIS`.
    """
    rows, samples = [], []
    cells = [(d, m) for d in distributions for m in batch_sizes]
    for index, (distribution, m) in enumerate(tqdm(cells, desc="theorem1 synthetic", unit="cell")):
        rng = np.random.default_rng([seed, index])
        xi_mu, xi_sigma = synthetic_noise(distribution, m, batches, rng)
        rows.append({"data": distribution, **summarize(xi_mu, xi_sigma, m, KURTOSIS[distribution])})
        samples.append(CellSamples(distribution, m, xi_mu, xi_sigma))
    return rows, samples


# ----------------------------------------------------------------------------------------------------
# Real activations: one BN layer's inputs, recorded once (see activations.py), then resampled.


def run_real(center: np.ndarray, image_mean: np.ndarray, image_sqmean: np.ndarray, spatial_size: int,
             batches: int, seed: int, batch_sizes: Sequence[int] = BATCH_SIZES,
             chunk: int = 2_000) -> tuple[list[dict], list[dict], list[CellSamples]]:
    """Theorem 1 on recorded BN inputs, batches of ``m`` images drawn uniformly (with replacement).

    Two views of the same layer:

    * **neuron** -- each channel at the centre pixel is one neuron with ``m`` i.i.d. samples per batch:
      the theorem's own setting, on real (non-Gaussian) data. Population mean/std/kurtosis per neuron are
      taken over all recorded images.
    * **channel** -- what ``BatchNorm2d`` really does: statistics over ``m x H x W`` values per channel.
      Pixels of one image are correlated, so the noise is neither ``1/m`` nor ``1/(m H W)``; the study
      reports ``n_eff = 1/(m Var(xi_mu))``, the number of independent samples one image is worth.

    Args:
        center: ``(N, C)`` BN input at the centre pixel of each image.
        image_mean: ``(N, C)`` per-image spatial mean of the BN input.
        image_sqmean: ``(N, C)`` per-image spatial mean of its square.
        spatial_size: ``H * W`` of the feature map.
        batches: batches drawn per ``m``.
        seed: random seed.
        batch_sizes: the ``m`` values.
        chunk: batches processed at once.

    Returns:
        ``(neuron_rows, channel_rows, samples)``: per-``m`` summaries (medians over channels, plus the
        per-channel rows under ``"per_channel"`` for the neuron view) and pooled samples for QQ plots.
    """
    center = np.asarray(center, dtype=np.float64)
    image_mean = np.asarray(image_mean, dtype=np.float64)
    image_sqmean = np.asarray(image_sqmean, dtype=np.float64)
    n_images, channels = center.shape
    if image_mean.shape != center.shape or image_sqmean.shape != center.shape:
        raise ValueError(f"center, image_mean and image_sqmean must share shape (N, C); got {center.shape}, "
                         f"{image_mean.shape}, {image_sqmean.shape}")
    neuron_mean = center.mean(0)
    neuron_std = center.std(0)
    neuron_kurtosis = np.mean((center - neuron_mean) ** 4, axis=0) / neuron_std**4
    channel_mean = image_mean.mean(0)
    channel_std = np.sqrt(image_sqmean.mean(0) - channel_mean**2)
    live = (neuron_std > 1e-6 * max(float(neuron_std.max()), 1e-30)) & (channel_std > 0)
    if not live.any():
        raise ValueError("every recorded channel is constant: nothing to measure")

    neuron_rows, channel_rows, samples = [], [], []
    for index, m in enumerate(tqdm(batch_sizes, desc="theorem1 real", unit="m")):
        rng = np.random.default_rng([seed, 1000 + index])
        n_mu, n_sig, c_mu, c_sig = [], [], [], []
        for start in range(0, batches, chunk):
            rows = min(chunk, batches - start)
            idx = rng.integers(0, n_images, size=(rows, m))
            mu, sig = batch_noise(center[idx][..., live], neuron_mean[live], neuron_std[live])
            n_mu.append(mu)
            n_sig.append(sig)
            batch_mean = image_mean[idx][..., live].mean(1)
            batch_var = image_sqmean[idx][..., live].mean(1) - batch_mean**2
            c_mu.append((channel_mean[live] - batch_mean) / channel_std[live])
            c_sig.append(batch_var / channel_std[live] ** 2)
        n_mu, n_sig = np.concatenate(n_mu), np.concatenate(n_sig)
        c_mu, c_sig = np.concatenate(c_mu), np.concatenate(c_sig)

        per_channel = [summarize(n_mu[:, c], n_sig[:, c], m, float(k))
                       for c, k in enumerate(neuron_kurtosis[live])]
        neuron_rows.append({"data": "real_neuron", **_median_row(per_channel), "per_channel": per_channel})
        var_mu = c_mu.var(0)
        var_sig = c_sig.var(0)
        channel_rows.append({
            "data": "real_channel", "m": m, "batches": batches, "channels": int(live.sum()),
            "spatial_size": spatial_size,
            "var_mu_ratio": float(np.median(var_mu * m)),  # 1 = one sample/image, 1/(HW) = HW i.i.d.
            "n_eff_per_image": float(np.median(1.0 / (var_mu * m))),
            "mean_sigma": float(np.median(c_sig.mean(0))),
            "m_var_sigma": float(np.median(var_sig * m)),
            "ks_mu_normal_fitted": float(np.median([
                stats.kstest(c_mu[:, c] / np.sqrt(var_mu[c]), "norm").statistic for c in range(c_mu.shape[1])])),
        })
        stride = max(1, n_mu.size // 1_000_000)  # the QQ plot needs no more than ~1M pooled values
        samples.append(CellSamples("real_neuron", m, n_mu.ravel()[::stride], n_sig.ravel()[::stride]))
    return neuron_rows, channel_rows, samples


def _median_row(per_channel: list[dict]) -> dict:
    """Median over channels of every numeric field (``m``/``batches`` are shared)."""
    keys = [k for k in per_channel[0] if k not in ("m", "batches")]
    row = {"m": per_channel[0]["m"], "batches": per_channel[0]["batches"], "channels": len(per_channel)}
    row.update({k: float(np.median([r[k] for r in per_channel])) for k in keys})
    return row


# ----------------------------------------------------------------------------------------------------
# Figures


def _qq_probabilities(n: int) -> np.ndarray:
    """Probabilities for QQ plots, denser in the tails (logit-spaced), within the sample's resolution."""
    edge = min(1e-4, 10.0 / max(n, 1))
    logits = np.linspace(np.log(edge / (1 - edge)), -np.log(edge / (1 - edge)), 121)
    return 1.0 / (1.0 + np.exp(-logits))


def plot_qq(samples: Sequence[CellSamples], path: Path) -> None:
    """QQ plots: sqrt(m) xi_mu vs N(0,1) (top row) and xi_sigma vs chi2(m-1)/m (bottom row, log-log)."""
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(s.data for s in samples))
    fig, axes = plt.subplots(2, len(datasets), figsize=(3.3 * len(datasets), 6.4), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(BATCH_SIZES)))
    for col, data in enumerate(datasets):
        ax_mu, ax_sig = axes[0, col], axes[1, col]
        for s in (s for s in samples if s.data == data):
            color = colors[BATCH_SIZES.index(s.m)] if s.m in BATCH_SIZES else "k"
            p = _qq_probabilities(s.xi_mu.size)
            ax_mu.plot(stats.norm.ppf(p), np.quantile(s.xi_mu * np.sqrt(s.m), p), color=color, lw=1.2,
                       label=f"m={s.m}")
            ax_sig.plot(stats.chi2(s.m - 1).ppf(p) / s.m, np.quantile(s.xi_sigma, p), color=color, lw=1.2)
        lim = 4.5
        ax_mu.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
        ax_mu.set(xlim=(-lim, lim), ylim=(-1.6 * lim, 1.6 * lim), title=data,
                  xlabel="N(0,1) quantile", ylabel=r"$\sqrt{m}\,\xi_\mu$ quantile" if col == 0 else None)
        ax_sig.set_xscale("log")
        ax_sig.set_yscale("log")
        ax_sig.plot([1e-8, 1e2], [1e-8, 1e2], "k:", lw=0.8)
        ax_sig.set(xlim=(1e-6, 20), ylim=(1e-6, 20), xlabel=r"$\chi^2(m-1)/m$ quantile",
                   ylabel=r"$\xi_\sigma$ quantile" if col == 0 else None)
        if col == 0:
            ax_mu.legend(fontsize=7, loc="upper left")
    fig.suptitle("Theorem 1: QQ plots of BN's batch-statistic noise (dotted: the predicted distribution)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_variances(rows: Sequence[dict], path: Path) -> None:
    """Measured m Var(xi_mu), m Var(xi_sigma) and KS distances vs m, with the predictions."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    colors = dict(zip(datasets, plt.cm.tab10.colors))
    for data in datasets:
        sub = [r for r in rows if r["data"] == data]
        ms = np.array([r["m"] for r in sub])
        color = colors[data]
        axes[0].errorbar(ms, [r["var_mu_ratio"] for r in sub], yerr=[r.get("var_mu_ratio_se", 0) for r in sub],
                         marker="o", color=color, label=data, capsize=2)
        axes[1].errorbar(ms, [r["m_var_sigma"] for r in sub], yerr=[r.get("m_var_sigma_se", 0) for r in sub],
                         marker="o", color=color, label=f"{data} measured", capsize=2)
        kappa = float(np.median([r["kurtosis"] for r in sub]))
        fine = np.arange(2, ms.max() + 1)
        axes[1].plot(fine, [m * var_xi_sigma_exact(m, kappa) for m in fine], color=color, lw=0.8)
        axes[1].axhline(kappa - 1, color=color, ls="--", lw=0.8)
        axes[1].axhline(kappa, color=color, ls=":", lw=0.8)
        axes[2].plot(ms, [r["ks_mu_normal"] for r in sub], marker="o", color=color, label=f"{data}: " + r"$\xi_\mu$")
        axes[2].plot(ms, [r["ks_sigma_chi2"] for r in sub], marker="s", ls="--", color=color)
        axes[2].plot(ms, [r["ks_sigma_normal_kappa_minus_1"] for r in sub], marker="^", ls=":", color=color)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="batch size m", ylabel=r"$m\,\mathrm{Var}(\xi_\mu)$",
                title=r"$\xi_\mu$: measured / predicted $1/m$")
    axes[0].legend(fontsize=7)
    axes[1].set(xscale="log", xlabel="batch size m", ylabel=r"$m\,\mathrm{Var}(\xi_\sigma)$",
                title="dashed $\\kappa-1$, dotted $\\kappa$, thin: exact finite m")
    axes[1].legend(fontsize=7)
    for batches in sorted({r["batches"] for r in rows}):  # 95% KS noise level of each sample size
        axes[2].axhline(1.36 / np.sqrt(batches), color="grey", lw=0.8)
    axes[2].set(xscale="log", yscale="log", xlabel="batch size m", ylabel="KS distance",
                title="KS distances (grey: 95% sampling noise)")
    style_handles = [plt.Line2D([], [], color="k", marker="o", label=r"$\xi_\mu$ vs N(0,1/m)"),
                     plt.Line2D([], [], color="k", marker="s", ls="--", label=r"$\xi_\sigma$ vs $\chi^2(m-1)/m$"),
                     plt.Line2D([], [], color="k", marker="^", ls=":", label=r"$\xi_\sigma$ vs N(1,($\kappa$-1)/m)")]
    axes[2].legend(handles=style_handles, fontsize=7)
    for ax in axes:
        ax.set_xticks(BATCH_SIZES, [str(m) for m in BATCH_SIZES])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    fig.tight_layout()
    save_figure(fig, path)


def plot_real_kurtosis(neuron_rows: Sequence[dict], path: Path) -> None:
    """Per-neuron m Var(xi_sigma) at the largest m vs the neuron's kappa - 1 (real activations)."""
    import matplotlib.pyplot as plt

    row = neuron_rows[-1]
    per = row["per_channel"]
    kappa = np.array([r["kurtosis"] for r in per])
    measured = np.array([r["m_var_sigma"] for r in per])
    exact = np.array([row["m"] * var_xi_sigma_exact(row["m"], k) for k in kappa])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.scatter(kappa - 1, measured, s=12, label="measured, per neuron")
    ax.scatter(kappa - 1, exact, s=8, marker="x", label="exact finite-m formula")
    grid = np.linspace(0, kappa.max(), 10)
    ax.plot(grid, grid, "k--", lw=0.8, label=r"$(\kappa-1)$")
    ax.plot(grid, grid + 1, "k:", lw=0.8, label=r"$\kappa$")
    ax.set(xlabel=r"neuron kurtosis $\kappa - 1$", ylabel=r"$m\,\mathrm{Var}(\xi_\sigma)$",
           title=f"real activations, m={row['m']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# Command


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; returns the summary written to ``summary.json``.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).
    """
    parser = base_parser(__doc__.split("\n\n")[0], "theorem1")
    parser.add_argument("--batches", type=positive_int, default=None,
                        help="batches per (data, m) cell (default 500000 synthetic / 50000 real; --quick: 4000/2000)")
    from experiments.theory.activations import add_real_args

    add_real_args(parser)
    args = parser.parse_args(argv)
    if args.real_fake and args.real_archive is not None:
        parser.error("--real-fake and --real-archive exclude each other")
    synthetic_batches = args.batches or (4_000 if args.quick else 500_000)
    real_batches = args.batches or (2_000 if args.quick else 50_000)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    rows, samples = run_synthetic(synthetic_batches, args.seed)
    summary: dict = {"synthetic": rows, "synthetic_batches": synthetic_batches}

    if args.real_archive is not None or args.real_fake:
        from experiments.theory.activations import record_from_args

        recorded = record_from_args(args)
        neuron_rows, channel_rows, real_samples = run_real(
            recorded["center"], recorded["image_mean"], recorded["image_sqmean"], recorded["spatial_size"],
            real_batches, args.seed)
        summary["real"] = {"setup": recorded["setup"], "neuron": neuron_rows, "channel": channel_rows,
                           "batches": real_batches}
        write_csv(out / "real_neuron.csv", [{k: v for k, v in r.items() if k != "per_channel"}
                                            for r in neuron_rows])
        write_csv(out / "real_channel.csv", channel_rows)
        rows = rows + [{k: v for k, v in r.items() if k != "per_channel"} for r in neuron_rows]
        samples = samples + real_samples
        plot_real_kurtosis(neuron_rows, out / "theorem1_real_kurtosis.png")

    summary["seconds"] = time.perf_counter() - started
    write_csv(out / "theorem1.csv", rows)
    write_json(out / "summary.json", summary)
    plot_qq(samples, out / "theorem1_qq.png")
    plot_variances(rows, out / "theorem1_variance_ks.png")
    _print_summary(rows, summary)
    return summary


def _print_summary(rows: Sequence[dict], summary: dict) -> None:
    print(f"{'data':<12} {'m':>3} {'mVar(xi_mu)':>11} {'KS mu':>7} {'mean xi_s':>9} {'mVar(xi_s)':>10} "
          f"{'kappa':>6} {'/exact':>7} {'KS chi2':>8} {'KS N(k-1)':>9}")
    for r in rows:
        print(f"{r['data']:<12} {r['m']:>3} {r['var_mu_ratio']:>11.4f} {r['ks_mu_normal']:>7.4f} "
              f"{r['mean_sigma']:>9.4f} {r['m_var_sigma']:>10.4f} {r['kurtosis']:>6.2f} "
              f"{r['var_sigma_ratio_exact']:>7.4f} {r['ks_sigma_chi2']:>8.4f} {r['ks_sigma_normal_kappa_minus_1']:>9.4f}")
    for r in summary.get("real", {}).get("channel", []):
        print(f"real_channel m={r['m']:>3}: m Var(xi_mu)={r['var_mu_ratio']:.4f} "
              f"(n_eff/image={r['n_eff_per_image']:.2f} of {r['spatial_size']} pixels), "
              f"m Var(xi_sigma)={r['m_var_sigma']:.4f}")
    print(f"done in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
