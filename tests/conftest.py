"""Shared test setup: quiet, offline, single-threaded runs, tiny-run overrides for ``mbn-train``, and
the ``torch_compile`` marker (skipped on a torch too old to compile MBN)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two pytest workers share two cores: one torch thread each avoids oversubscription stalls.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``torch_compile`` tests on a torch that trainer.compile refuses (the floor env's 2.3)."""
    from mbn.nn.functional import COMPILE_MIN_TORCH, compile_supported

    if compile_supported():
        return
    import torch

    needed = ".".join(map(str, COMPILE_MIN_TORCH))
    skip = pytest.mark.skip(reason=f"compiling MBN needs torch >= {needed} (mbn.nn.functional.COMPILE_MIN_TORCH), this is {torch.__version__}")
    for item in items:
        if item.get_closest_marker("torch_compile"):
            item.add_marker(skip)


def _tiny_overrides(output_root: Path, **extra: object) -> list[str]:
    """``mbn-train`` overrides for a run of a few seconds: 8x8 fake images, width-4 ResNet-18, 1 epoch.

    Args:
        output_root: where the run dirs go.
        **extra: more ``key=value`` overrides (dots in keys written as ``__``).
    """
    overrides = {
        "data": "fake",
        "data.source.num_train": 64,
        "data.source.num_test": 32,
        "data.source.image_size": 8,
        "data.batch_size": 8,
        "data.eval_batch_size": 32,
        "model.width": 4,
        "epochs": 1,
        # One thread, or the count `make test-threads` sets: their reduction orders must not matter.
        "trainer.num_threads": os.environ["OMP_NUM_THREADS"],
        # W&B is on by default; its start-up costs seconds per run, so only its own tests use it.
        "logger": "[csv]",
        "output_root": str(output_root),
    }
    overrides.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.fixture
def run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B offline with its files in the test's tmp dir; returns an ``output_root`` there."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.delenv("MBN_OUTPUT_ROOT", raising=False)
    return tmp_path / "outputs"


@pytest.fixture
def tiny(run_env: Path):
    """``tiny(**extra) -> list[str]``: overrides of a few-second fake-data run under ``run_env``.

    Keys use ``__`` for dots: ``tiny(norm="mbn", data__batch_size=4)``.
    """
    return lambda **extra: _tiny_overrides(run_env, **extra)
