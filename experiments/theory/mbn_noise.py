"""MBN noise: the noise of the momentum statistics of the real ``MomentumBatchNorm1d`` layer on i.i.d. data.

MBN normalizes with momentum statistics ``M <- lam M + (1 - lam) mu_B`` and
``Phi <- lam Phi + (1 - lam) sigma_B^2`` (biased batch variance). For i.i.d. batches this is an AR(1)
process whose stationary variance is ``(1 - lam)/(1 + lam)`` times that of the batch statistic::

    Var(M)   = (1 - lam) / ((1 + lam) m)                   (sigma^2 = 1), i.e. Var(xi_mu) of a batch of
    m_eq     = m (1 + lam) / (1 - lam)                       samples: the equivalent batch size
    Var(Phi) = (1 - lam) / (1 + lam) * 2 (m - 1) / m^2        (Gaussian data)

The study drives the real layer (``schedule="fixed"``, float64, ``affine=False``) with i.i.d. standard
normal batches of ``m`` rows and ``C`` channels (independent replicas), reads its ``momentum_mean`` /
``momentum_var`` buffers after every step, checks them against an independent recursion on the same
batches, and compares their stationary variance with the prediction. It also plots the schedule
``lam(t)`` (per epoch, T = 200) and ``tau`` for m in {2, 4, 8, 16}, with the equivalent batch size the
schedule gives over training (at the end, ``lam = 1 - m/m0`` so ``m_eq = 2 m0 - m``).

Command::

    python -m experiments.theory.mbn_noise --out DIR [--steps N] [--channels C] [--quick]
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from experiments.theory.common import base_parser, positive_int, save_figure, write_csv, write_json
from mbn.nn import MomentumBatchNorm1d, schedule

LAMS: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
BATCH_SIZES: tuple[int, ...] = (2, 4, 8, 16)


def predicted_variance_ratio(lam: float) -> float:
    """Stationary ``Var(momentum statistic) / Var(batch statistic) = (1 - lam)/(1 + lam)``."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1), got {lam!r}")
    return (1.0 - lam) / (1.0 + lam)


def equivalent_batch_size(m: float, lam: float) -> float:
    """Batch size whose plain-BN mean noise equals MBN's at momentum ``lam``: ``m (1 + lam)/(1 - lam)``."""
    return m / predicted_variance_ratio(lam)


def burn_in_steps(lam: float) -> int:
    """Steps after which the start's influence (``lam^t``) is below ``e^-5`` (< 1%)."""
    return 1 if lam == 0.0 else math.ceil(5.0 / (1.0 - lam))


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the tensors are tiny, and on a busy machine extra threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(lam: float, m: int, channels: int, steps: int, seed: int) -> dict[str, float]:
    """Drive the real layer with i.i.d. N(0, 1) batches and measure its momentum statistics' noise.

    Variances are taken about the known stationary means (0 for ``M``, ``(m-1)/m`` for ``Phi``), so
    the strong autocorrelation at large ``lam`` does not bias them; standard errors come from the spread
    over the independent channels.

    Args:
        lam: momentum (``schedule="fixed"``).
        m: batch size (rows per step).
        channels: independent channels (replicas).
        steps: measured steps after the burn-in.
        seed: random seed.

    Returns:
        Measured and predicted numbers, plus the largest difference between the layer's buffers and
        the independent recursion over all steps.
    """
    generator = torch.Generator().manual_seed(seed)
    layer = MomentumBatchNorm1d(channels, schedule="fixed", fixed_lam=lam, affine=False, dtype=torch.float64)
    layer.train()
    recursion_mean = np.zeros(channels)
    recursion_var = np.zeros(channels)
    sums = {"M": np.zeros(channels), "M2": np.zeros(channels), "P": np.zeros(channels), "P2": np.zeros(channels)}
    batch_var_sum = np.zeros(channels)
    max_diff = 0.0
    burn_in = burn_in_steps(lam)
    phi_mean = (m - 1) / m
    with torch.no_grad(), _single_thread():
        for step in range(burn_in + steps):
            x = torch.randn(m, channels, generator=generator, dtype=torch.float64)
            layer(x)
            values = x.numpy()
            mu_b, var_b = values.mean(0), values.var(0)
            if step == 0:  # the layer initializes its momentum statistics from the first batch
                recursion_mean, recursion_var = mu_b, var_b
            else:
                recursion_mean = lam * recursion_mean + (1.0 - lam) * mu_b
                recursion_var = lam * recursion_var + (1.0 - lam) * var_b
            buffer_mean = layer.momentum_mean.numpy()
            buffer_var = layer.momentum_var.numpy()
            max_diff = max(max_diff, float(np.abs(buffer_mean - recursion_mean).max()),
                           float(np.abs(buffer_var - recursion_var).max()))
            if step >= burn_in:
                sums["M"] += buffer_mean
                sums["M2"] += buffer_mean**2
                sums["P"] += buffer_var
                sums["P2"] += (buffer_var - phi_mean) ** 2
                batch_var_sum += (var_b - phi_mean) ** 2
    var_m = sums["M2"] / steps  # about the known mean 0, per channel
    var_p = sums["P2"] / steps  # about the known mean (m-1)/m
    ratio = predicted_variance_ratio(lam)
    var_batch_var = 2.0 * (m - 1) / m**2
    return {
        "lam": lam, "m": m, "channels": channels, "steps": steps, "burn_in": burn_in,
        "layer_vs_recursion_max_abs_diff": max_diff,
        "var_M": float(var_m.mean()), "var_M_se": float(var_m.std(ddof=1) / np.sqrt(channels)),
        "var_M_pred": ratio / m,
        "var_M_ratio": float(var_m.mean() * m / ratio),
        "m_eq": float(1.0 / var_m.mean()), "m_eq_pred": equivalent_batch_size(m, lam),
        "mean_M": float(sums["M"].mean() / steps),
        "mean_Phi": float(sums["P"].mean() / steps), "mean_Phi_pred": phi_mean,
        "var_Phi": float(var_p.mean()), "var_Phi_se": float(var_p.std(ddof=1) / np.sqrt(channels)),
        "var_Phi_pred": ratio * var_batch_var,
        "var_Phi_ratio": float(var_p.mean() / (ratio * var_batch_var)),
        # sanity of the data itself: Var(sigma_B^2) of the batches = 2 (m-1)/m^2
        "var_batch_var_ratio": float(batch_var_sum.mean() / steps / var_batch_var),
    }


def schedule_curves(total_epochs: int, batch_sizes: Sequence[int], m0: float = 32, tau0: float = 0.9) -> dict:
    """``lam(t)`` per (1-based, integer) epoch, ``tau`` and the equivalent batch size per ``m``."""
    epochs = list(range(1, total_epochs + 1))
    curves = {}
    for m in batch_sizes:
        lams = [schedule.lam(t, total_epochs, m, m0) for t in epochs]
        curves[m] = {
            "lam": lams,
            "tau": schedule.tau(m, m0, tau0),
            "m_eq": [equivalent_batch_size(m, lam) for lam in lams],
            "tau_m_eq": equivalent_batch_size(m, schedule.tau(m, m0, tau0)),
        }
    return {"epochs": epochs, "m0": m0, "tau0": tau0, "T": total_epochs, "curves": curves}


def plot(rows: Sequence[dict], curves: dict, path: Path) -> None:
    """Equivalent batch size and variance ratios, measured vs predicted; lam(t) with tau; m_eq over training."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    ms = sorted({r["m"] for r in rows})
    colors = dict(zip(ms, plt.cm.viridis(np.linspace(0, 0.85, len(ms)))))
    lams = sorted({r["lam"] for r in rows})
    offsets = dict(zip(ms, np.linspace(-0.25, 0.25, len(ms))))  # spread markers at equal lam
    for m in ms:
        sub = [r for r in rows if r["m"] == m]
        position = np.array([lams.index(r["lam"]) for r in sub], dtype=float)
        pred = np.array([r["m_eq_pred"] for r in sub])
        axes[0].errorbar(pred, [r["m_eq"] for r in sub],
                         yerr=[r["var_M_se"] / r["var_M"] ** 2 for r in sub], fmt="o", color=colors[m], ms=4,
                         label=f"m={m}")
        axes[1].errorbar(position + offsets[m], [r["var_M_ratio"] for r in sub],
                         yerr=[r["var_M_se"] / r["var_M_pred"] for r in sub], fmt="o", color=colors[m], ms=4,
                         capsize=2, label=f"m={m}: M")
        axes[1].errorbar(position + offsets[m], [r["var_Phi_ratio"] for r in sub],
                         yerr=[r["var_Phi_se"] / r["var_Phi_pred"] for r in sub], fmt="s", mfc="none",
                         color=colors[m], ms=5, capsize=2, label=f"m={m}: Phi")
    lim = [1, 5000]
    axes[0].plot(lim, lim, "k:", lw=0.8)
    axes[0].set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="predicted m (1+lam)/(1-lam)",
                ylabel="measured 1 / Var(M)", title="equivalent batch size of the momentum mean")
    axes[0].legend(fontsize=7)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(lams)), [f"{lam:g}" for lam in lams])
    axes[1].set(xlabel="momentum lam", ylabel="measured / predicted variance",
                title="o Var(M) vs (1-lam)/((1+lam) m), s Var(Phi)")
    axes[1].legend(fontsize=6, ncol=2)

    epochs = curves["epochs"]
    for m, curve in curves["curves"].items():
        color = colors.get(m, "k")
        axes[2].plot(epochs, curve["lam"], color=color, label=f"m={m}, tau={curve['tau']:.4f}")
        axes[3].plot(epochs, curve["m_eq"], color=color, label=f"m={m}")
    axes[2].set(xlabel=f"epoch t (T={curves['T']})", ylabel="lam(t)",
                title=f"MBN schedule (m0={curves['m0']:g}, tau0={curves['tau0']:g})")
    axes[2].legend(fontsize=7)
    axes[3].axhline(curves["m0"], color="k", ls=":", lw=0.8, label="m0 (BN at the ideal batch)")
    axes[3].set_yscale("log")
    ticks = [2, 4, 8, 16, 32, 64]
    axes[3].set_yticks(ticks, [str(t) for t in ticks])
    axes[3].yaxis.set_minor_formatter(plt.NullFormatter())
    axes[3].set(xlabel="epoch t", ylabel="m (1+lam)/(1-lam)", title="equivalent batch size of M over training")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; returns the summary written to ``summary.json``."""
    parser = base_parser(__doc__.split("\n\n")[0], "mbn_noise")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="measured steps per (lam, m) after burn-in (default 8000; --quick: 300)")
    parser.add_argument("--channels", type=positive_int, default=None,
                        help="independent channels (default 1024; --quick: 128)")
    parser.add_argument("--epochs", type=positive_int, default=200, help="T for the schedule plot")
    args = parser.parse_args(argv)
    steps = args.steps or (300 if args.quick else 8000)
    channels = args.channels or (128 if args.quick else 1024)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = [(lam, m) for m in BATCH_SIZES for lam in LAMS]
    rows = [measure(lam, m, channels, steps, seed=args.seed * 1000 + index)
            for index, (lam, m) in enumerate(tqdm(cells, desc="mbn noise", unit="cell"))]
    curves = schedule_curves(args.epochs, BATCH_SIZES)
    summary = {"rows": rows, "schedule": curves, "seconds": time.perf_counter() - started}
    write_csv(out / "mbn_noise.csv", rows)
    write_json(out / "summary.json", summary)
    plot(rows, curves, out / "mbn_noise.png")
    print(f"{'m':>3} {'lam':>5} {'Var(M)':>9} {'pred':>9} {'ratio':>6} {'m_eq':>8} {'pred':>8} "
          f"{'Var(Phi) ratio':>14} {'mean Phi':>8} {'|layer-rec|':>11}")
    for r in rows:
        print(f"{r['m']:>3} {r['lam']:>5.2f} {r['var_M']:>9.5f} {r['var_M_pred']:>9.5f} {r['var_M_ratio']:>6.3f} "
              f"{r['m_eq']:>8.1f} {r['m_eq_pred']:>8.1f} {r['var_Phi_ratio']:>14.3f} {r['mean_Phi']:>8.4f} "
              f"{r['layer_vs_recursion_max_abs_diff']:>11.1e}")
    for m, curve in curves["curves"].items():
        print(f"schedule m={m}: lam(1)={curve['lam'][0]:.3f} lam(T)={curve['lam'][-1]:.4f} "
              f"m_eq(T)={curve['m_eq'][-1]:.1f} tau={curve['tau']:.4f}")
    print(f"done in {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()
