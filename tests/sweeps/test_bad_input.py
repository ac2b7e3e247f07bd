"""Bad input through ``mbn-train``: corrupt or missing data archive, read-only output dir, a full disk,
a sweep name that leaves the sweeps dir.

Each gives one clear line and a non-zero exit, and leaves nothing a later rerun would trust.
(A full disk while saving a checkpoint, in train() itself: tests/train/test_train_checkpoint_io.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import mbn_train as main
from mbn.results import iter_results, read_results
from mbn.train import checkpoint_io
from mbn.utils import io

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
    # The same error in every job: one line.
    assert err == f"mbn-train: invalid config: data.source.archive: no such file: {missing} (all 2 jobs; sweep not started)\n"
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


@pytest.mark.parametrize("sweep_name", ["..", "", "/tmp/elsewhere"])
def test_a_sweep_name_that_leaves_the_sweeps_dir_gives_one_line_and_exit_2(sweep_name, tiny, run_env, capsys):
    assert main(["-m", *tiny(), "seed=0,1", f"sweep_name={sweep_name}"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"mbn-train: invalid config: sweep_name: must name a dir inside its parent "
                                        f"(not empty, '.' or '..', no '/'), got {sweep_name!r} (all 2 jobs; sweep not started)"]
    assert "Traceback" not in out + err
    assert not list(run_env.rglob("results.json")) and not list(run_env.rglob(".hydra"))


class FullDisk:
    """Fault injection at the write: once the disk is "full", every atomic write (results.json,
    checkpoints) fails with ENOSPC after part of the file reached the disk, as on a real full disk.

    Args:
        monkeypatch: the test's.
        after_checkpoints: how many checkpoint files are saved first (0: full from the start).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after_checkpoints: int = 0) -> None:
        self.after_checkpoints = after_checkpoints
        self.saved = 0
        self.failed = 0
        real = io.atomic_write

        def atomic_write(path, write):
            if self.saved >= self.after_checkpoints:
                self.failed += 1
                return real(path, self._fail)
            written = real(path, write)
            self.saved += Path(path).suffix == ".ckpt"
            return written

        monkeypatch.setattr(io, "atomic_write", atomic_write)
        monkeypatch.setattr(checkpoint_io, "atomic_write", atomic_write)

    @staticmethod
    def _fail(f) -> None:
        f.write(b"\x00" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_start_up_is_one_line_and_exit_1(tiny, run_env, monkeypatch, capsys):
    FullDisk(monkeypatch)
    assert main(tiny()) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in (out + err).splitlines() if line.startswith("mbn-train")]
    (run_dir,) = (run_env / "runs").iterdir()
    assert len(lines) == 1 and lines[0].startswith(f"mbn-train: failed {run_dir}")
    assert lines[0].endswith(f" - the disk is full (no space left on device) writing {run_dir / 'results.json'}")
    assert not (run_dir / "results.json").exists()  # never a "running" record of a dead process


def test_a_full_disk_mid_run_is_recorded_failed_and_the_rerun_resumes(tiny, run_env, monkeypatch, capsys):
    argv = tiny(epochs=2)
    disk = FullDisk(monkeypatch, after_checkpoints=2)  # epoch 1's last.ckpt and best.ckpt, then the disk is full
    assert main(argv) == 1
    out, err = capsys.readouterr()
    (run_dir,) = (run_env / "runs").iterdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    (line,) = [line for line in (out + err).splitlines() if line.startswith("mbn-train")]
    assert line.startswith(f"mbn-train: failed {run_dir}") and "Traceback" not in out + err
    # Epoch 2's record (epoch 1's checkpoints took the last space) is the first write that finds the disk full.
    error = f"DiskFullError: the disk is full (no space left on device) writing {run_dir / 'results.json'}"
    assert line.endswith(f" - {error}")
    record = read_results(run_dir)  # written over its own blocks: the atomic write had no room
    assert record["status"] == "failed" and record["attempts"][-1]["status"] == "failed"
    assert record["error"] == error
    assert disk.failed >= 2  # the checkpoint, then the record's atomic write
    monkeypatch.undo()

    assert main(argv) == 0  # space again: resumes from epoch 1's checkpoint
    record = read_results(run_dir)
    assert [a["status"] for a in record["attempts"]] == ["failed", "completed"]
    assert record["attempts"][1]["resumed_from"] == str(last)
    assert [row["epoch"] for row in record["history"]] == [1, 2]


def test_a_full_disk_before_the_job_starts_is_one_line_naming_the_dir(tiny, run_env, monkeypatch, capsys):
    import hydra.core.utils

    def no_space(*args, **kwargs):  # Hydra saving the job's .hydra/config.yaml on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hydra.core.utils, "_save_config", no_space)
    assert main(tiny()) == 1
    out, err = capsys.readouterr()
    (run_dir,) = (run_env / "runs").iterdir()
    assert err == f"mbn-train: the disk is full (no space left on device) writing in {run_dir}\n"
    assert "Traceback" not in out
