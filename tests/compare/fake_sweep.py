"""Generator of a fake sweep dir with realistic results.json files (written through mbn.results.write_results).

Used by the ``fake_sweep`` fixture (conftest.py) and by tests/cli/test_compare_cli.py.

Grid: norms bn/gn/mbn x per-device batch sizes 2/8/32 x seeds 0/1/2, 4 epochs, with
- bn m=2 seed 2 failed (exception + traceback, after 1 epoch),
- gn m=32 seed 1 diverged (NaN loss in epoch 2),
- mbn m=32 seed 2 still running (2 of 4 epochs done),
- bn m=8 seed 1 missing (never launched: no dir at all).

Records are of the current schema, with a validation split (``val_*``) and the test split (``test_*``,
one point below the validation accuracy).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbn.compare.aggregate import DEFAULT_METRIC
from mbn.results import METRIC_KEYS, RESULTS_FILENAME, config_hash, write_results

NORMS = ("bn", "gn", "mbn")
BATCH_SIZES = (2, 8, 32)
SEEDS = (0, 1, 2)
EPOCHS = 4
SPECIAL = {
    ("bn", 2, 2): "failed",
    ("gn", 32, 1): "diverged",
    ("mbn", 32, 2): "running",
    ("bn", 8, 1): "missing",
}
# Accuracy each (norm, m) converges to: BN collapses at small m, GN is flat, MBN stays close to large-batch BN.
TARGET_ACC = {
    ("bn", 2): 0.62, ("bn", 8): 0.78, ("bn", 32): 0.84,
    ("gn", 2): 0.76, ("gn", 8): 0.77, ("gn", 32): 0.775,
    ("mbn", 2): 0.74, ("mbn", 8): 0.81, ("mbn", 32): 0.845,
}


@dataclass
class FakeSweep:
    """The generated sweep and the numbers it holds, for tests to recompute statistics independently."""

    root: Path
    run_dirs: dict[tuple[str, int, int], Path] = field(default_factory=dict)
    statuses: dict[tuple[str, int, int], str] = field(default_factory=dict)
    results: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)

    def completed_values(self, norm: str, m: int, metric: str = DEFAULT_METRIC) -> list[float]:
        """The metric of the completed runs of one cell, in seed order."""
        return [self.results[(norm, m, s)]["metrics"][metric] for s in SEEDS
                if self.statuses.get((norm, m, s)) == "completed"]

    @property
    def n_files(self) -> int:
        return len(self.run_dirs)


def lam_schedule(epoch: int, m: int, ideal: int = 32) -> float:
    """Decays to 0 over training; starts higher for smaller batches (stand-in for MBN's lam)."""
    rho = min(m / ideal, 1.0)
    return (1.0 - rho) * (1.0 - epoch / EPOCHS) if rho < 1 else 0.0


def tau_value(m: int, ideal: int = 32, tau0: float = 0.9) -> float:
    return tau0 ** (ideal / m) if m < ideal else tau0


def make_config(norm: str, m: int, seed: int, sweep_name: str, model: str = "resnet18",
                dataset: str = "cifar10_archive") -> dict[str, Any]:
    norm_cfg: dict[str, Any] = {"name": norm}
    if norm == "gn":
        norm_cfg["num_groups"] = 8
    if norm == "mbn":
        norm_cfg.update(ideal_batch_size=32, tau0=0.9, schedule="epoch")
    return {
        "norm": norm_cfg,
        "data": {"name": dataset, "batch_size": m, "archive": "../shared/data/cifar10-jpeg.tar.gz",
                 "train_subset": 2000, "val_subset": 500, "augment": True},
        "model": {"name": model, "width": 16},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                  "schedule": "step", "milestones": [0.3, 0.6, 0.9]},
        "trainer": {"name": "cpu", "devices": 1, "precision": "32-true"},
        "logger": {"csv": True, "wandb": {"project": "mbn", "offline": True}},
        "seed": seed,
        "epochs": EPOCHS,
        "sweep_name": sweep_name,
        "output_root": "/work/main/outputs",
    }


def make_history(norm: str, m: int, seed: int, rng: random.Random, epochs: int,
                 diverge_at: int | None = None) -> list[dict[str, Any]]:
    target = TARGET_ACC.get((norm, m), 0.7) + rng.uniform(-0.01, 0.01)
    history = []
    for epoch in range(1, epochs + 1):
        progress = epoch / EPOCHS
        val_acc1 = round(target * (1 - 0.6 * math.exp(-3 * progress)) + rng.uniform(-0.004, 0.004), 4)
        train_loss = round(2.3 * math.exp(-1.5 * progress) + 0.1, 4)
        if diverge_at == epoch:
            train_loss = float("nan")
        history.append({
            "epoch": epoch, "train_loss": train_loss, "train_acc1": round(min(val_acc1 + 0.05, 1.0), 4),
            "val_loss": round(1.8 - 1.2 * val_acc1, 4), "val_acc1": val_acc1,
            "val_acc5": round(min(val_acc1 + 0.15, 1.0), 4),
            "test_loss": round(1.81 - 1.2 * val_acc1, 4), "test_acc1": round(val_acc1 - 0.01, 4),
            "test_acc5": round(min(val_acc1 + 0.14, 1.0), 4), "lr": 0.1 * m / 64 * (0.1 if progress > 0.9 else 1.0),
            "lam": round(lam_schedule(epoch, m), 6) if norm == "mbn" else None,
            "tau": round(tau_value(m), 6) if norm == "mbn" else None,
            "time_s": round(rng.uniform(20, 40) * 32 / m, 2),
        })
    return history


def metrics_from(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return dict.fromkeys(METRIC_KEYS)
    best = max(history, key=lambda row: row["val_acc1"])
    last = history[-1]
    return {
        "final_test_acc1": last["test_acc1"], "final_test_acc5": last["test_acc5"], "final_test_loss": last["test_loss"],
        "best_test_acc1": max(row["test_acc1"] for row in history),
        "final_val_acc1": last["val_acc1"], "best_val_acc1": best["val_acc1"], "best_epoch": best["epoch"],
        "best_epoch_test_acc1": best["test_acc1"], "final_val_acc5": last["val_acc5"], "final_val_loss": last["val_loss"],
        "final_train_loss": last["train_loss"], "final_train_acc1": last["train_acc1"],
    }


def write_fake_run(run_dir: Path, norm: str, m: int, seed: int, status: str = "completed",
                   sweep_name: str = "fake", **config_overrides: Any) -> dict[str, Any]:
    """Write one realistic results.json; returns what was written."""
    config = make_config(norm, m, seed, sweep_name, **config_overrides)
    rng = random.Random(f"{norm}-{m}-{seed}-{sorted(config_overrides.items())}")
    epochs_done = {"completed": EPOCHS, "failed": 1, "diverged": 2, "running": 2, "interrupted": 3}[status]
    history = make_history(norm, m, seed, rng, epochs_done, diverge_at=2 if status == "diverged" else None)
    error = None
    if status == "failed":
        error = "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed.\nsecond line of detail"
    elif status == "diverged":
        error = "loss is nan at epoch 2, step 1234"
    elif status == "interrupted":
        error = "KeyboardInterrupt"
    results: dict[str, Any] = {
        "status": status,
        "error": error,
        "config_hash": config_hash(config),
        "config": config,
        "overrides": [f"norm={norm}", f"data.batch_size={m}", f"seed={seed}"],
        "output_dir": str(run_dir),
        "norm": norm, "model": config["model"]["name"], "dataset": config["data"]["name"], "seed": seed,
        "batch_size": m, "world_size": 1, "global_batch_size": m,
        "epochs": EPOCHS,
        "epochs_completed": epochs_done,
        "metrics": metrics_from(history) if status in ("completed", "running", "interrupted") else
        {**metrics_from([]), "final_train_loss": None},
        "history": history,
        "wall_time_s": round(sum(row["time_s"] for row in history), 2),
        "started_at": "2026-11-25T12:00:00+00:00",
        "finished_at": None if status == "running" else "2026-11-25T12:30:00+00:00",
        "versions": {"mbn": "0.1.0", "torch": "2.14.1", "pytorch_lightning": "2.6.6"},
    }
    if status == "failed":
        results["traceback"] = "Traceback (most recent call last):\n  File ...\nRuntimeError: ..."
    write_results(run_dir, results)
    return json.loads((run_dir / RESULTS_FILENAME).read_text())


def make_fake_sweep(root: Path, sweep_name: str = "fake") -> FakeSweep:
    """Write the fake sweep below ``root`` (Hydra-like job subdirs ``norm=bn,data.batch_size=2,seed=0``)."""
    sweep = FakeSweep(root=root)
    for norm in NORMS:
        for m in BATCH_SIZES:
            for seed in SEEDS:
                status = SPECIAL.get((norm, m, seed), "completed")
                if status == "missing":
                    continue
                run_dir = root / f"norm={norm},data.batch_size={m},seed={seed}"
                sweep.results[(norm, m, seed)] = write_fake_run(run_dir, norm, m, seed, status, sweep_name)
                sweep.run_dirs[(norm, m, seed)] = run_dir
                sweep.statuses[(norm, m, seed)] = status
    return sweep
