"""Bad input through ``mbn-train``: corrupt or missing data archive, read-only output dir.

Each gives one clear line and a non-zero exit, and leaves nothing a later rerun would trust.
(A full disk while saving a checkpoint: tests/train/test_train_checkpoint_io.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import mbn_train as main
from mbn.results import iter_results, read_results

CIFAR10_ARCHIVE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def archive_overrides(archive: Path, run_env: Path, tmp_path: Path) -> list[str]:
    return [
        "data=cifar10_archive", f"data.source.archive={archive}", f"paths.cache_dir={tmp_path / 'cache'}",
        "data.train_subset=80", "data.test_subset=100", "data.batch_size=8", "model.width=4", "epochs=1",
        "trainer.num_threads=1", f"output_root={run_env}",
    ]


@pytest.mark.parametrize("damage", ["truncated", "not-an-archive"])
def test_a_corrupt_archive_fails_the_run_with_one_line_naming_it(damage, run_env, tmp_path, capsys):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    if damage == "truncated":
        with open(CIFAR10_ARCHIVE, "rb") as f:
            archive.write_bytes(f.read(200_000))
    else:
        archive.write_bytes(b"this is not a tar.gz archive\n" * 100)
    assert main(archive_overrides(archive, run_env, tmp_path)) == 1
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("mbn-train: failed")]
    assert f"- ValueError: cannot read dataset archive {archive}: " in line
    (path,) = iter_results(run_env)
    results = read_results(path)
    assert results["status"] == "failed" and str(archive) in results["error"]
    assert not (path.parent / "checkpoints").exists()  # nothing a rerun could resume from


def test_a_missing_archive_stops_a_sweep_before_any_job(run_env, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.gz"
    assert main(["-m", *archive_overrides(missing, run_env, tmp_path), "seed=0,1"]) == 2
    err = capsys.readouterr().err
    assert f"data.source.archive: no such file: {missing}" in err
    assert "(every job of the sweep; none started)" in err and len(err.strip().splitlines()) == 1
    assert not list(run_env.rglob("results.json"))


def without_root_privilege() -> list[str]:
    """Command prefix under which root, too, obeys file permissions (drops CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only dir cannot be simulated")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_a_read_only_output_dir_gives_one_line_and_exit_2(multirun, tiny, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    command = [*without_root_privilege(), sys.executable, "-m", "mbn.cli.train", *(["-m", "seed=0,1"] if multirun else []),
               *tiny(), f"output_root={read_only / 'out'}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    where = read_only / "out" / ("sweeps/default" if multirun else "runs")
    assert lines[0].startswith(f"mbn-train: invalid config: output_root: cannot write to {where}")
    assert lines[0].endswith("Permission denied")
    assert list(read_only.iterdir()) == []
