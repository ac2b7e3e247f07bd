"""Fixtures of the mbn.compare tests: a fake sweep dir (see fake_sweep.py for its contents)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_sweep import FakeSweep, make_fake_sweep


@pytest.fixture
def fake_sweep(tmp_path: Path) -> FakeSweep:
    """norms bn/gn/mbn x m 2/8/32 x seeds 0/1/2 with a failed, a diverged, a running run and a missing seed."""
    return make_fake_sweep(tmp_path / "sweeps" / "fake")
