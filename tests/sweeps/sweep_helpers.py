"""Helpers of the sweep tests: find a sweep's jobs by their swept values, read their records."""

from __future__ import annotations

from pathlib import Path

import torch

from mbn.results import iter_results, read_results


def sweep_runs(sweep_dir: Path) -> dict[str, dict]:
    """``results.json`` of every job of a sweep dir, keyed by the job dir's name."""
    return {path.parent.name: read_results(path) for path in iter_results(sweep_dir)}


def job_dir(sweep_dir: Path, *parts: str) -> Path:
    """The one job dir of ``sweep_dir`` whose name contains every ``key=value`` in ``parts``."""
    matches = [p for p in sweep_dir.iterdir() if p.is_dir() and all(part in p.name.split(",") for part in parts)]
    assert len(matches) == 1, (parts, [p.name for p in sweep_dir.iterdir()])
    return matches[0]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Model state of a run's ``last.ckpt`` (loaded weights-only)."""
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(actual: dict, expected: dict, actual_dir: Path, expected_dir: Path) -> None:
    """Two records of the same config hold identical per-epoch metrics and identical final weights."""
    assert actual["config_hash"] == expected["config_hash"]
    for key in ("train_loss", "train_acc1", "test_loss", "test_acc1", "lr", "lam"):
        assert [row[key] for row in actual["history"]] == [row[key] for row in expected["history"]], key
    assert actual["metrics"] == expected["metrics"]
    got, want = final_weights(actual_dir), final_weights(expected_dir)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
