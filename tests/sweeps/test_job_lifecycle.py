"""One owner per job, tried as a user would: resume checks what it resumes, concurrent commands tell the truth.

Real ``mbn-train`` runs (in this process, and as two concurrent processes), tiny fake-data jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import mbn_train as main
from sweep_helpers import sweep_runs

from mbn.results import iter_results, read_results

ROOT = Path(__file__).resolve().parents[2]


def only_run(root: Path, *parts: str) -> Path:
    (run_dir,) = [p.parent for p in iter_results(root) if all(part in p.parent.name.split(",") for part in parts)]
    return run_dir


def test_a_checkpoint_copied_from_another_run_is_never_resumed(tiny, run_env, capsys):
    # A finished run at m=8 for 2 epochs, and an interrupted one at m=4 for 3 epochs (failed in epoch 2).
    assert main(tiny(**{"data.batch_size": 8, "epochs": 2})) == 0
    other = only_run(run_env, "data.batch_size=8")
    assert main(tiny(**{"data.batch_size": 4, "epochs": 3, "debug.fail_at_epoch": 2})) == 1
    victim = only_run(run_env, "data.batch_size=4")
    assert read_results(victim)["epochs_completed"] == 1
    shutil.copy(other / "checkpoints" / "last.ckpt", victim / "checkpoints" / "last.ckpt")
    capsys.readouterr()

    argv = tiny(**{"data.batch_size": 4, "epochs": 3})
    assert main([*argv, "dry_run=true"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"mbn-train: would replace {victim} (checkpoints/last.ckpt is from another config (hash ")

    assert main(argv) == 0
    record = read_results(victim)
    assert record["status"] == "completed" and [row["epoch"] for row in record["history"]] == [1, 2, 3]
    # Its own schedule from the start (lr = 0.1 * 4 / 64), not the other run's history.
    assert record["history"][0]["lr"] == pytest.approx(0.1 * 4 / 64) and record["history"][-1]["lr"] > 0
    assert [a["resumed_from"] for a in record["attempts"]] == [None]
    (moved,) = (victim / ".replaced").iterdir()
    assert (moved / "checkpoints" / "last.ckpt").is_file()


def test_a_checkpoint_that_will_not_load_weights_only_is_refused_with_our_message(tiny, run_env, capsys):
    argv = tiny(epochs=2)
    assert main([*argv, "debug.fail_at_epoch=2"]) == 1
    run_dir = only_run(run_env)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    capsys.readouterr()
    assert main([*argv, "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mbn-train: cannot resume {run_dir}: ") and "remove it to restart the run" in out
    assert "would resume" not in out and "weights_only=False" not in out

    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"mbn-train: failed {run_dir}" in out and "remove it to restart the run" in out
    record = read_results(run_dir)
    assert record["status"] == "failed" and "refused" in record["error"] and record["epochs_completed"] == 1


def test_a_completed_run_whose_record_was_cut_short_is_rebuilt_from_its_checkpoint_not_retrained(tiny, run_env, capsys):
    argv = tiny(epochs=2)
    assert main(argv) == 0
    run_dir = only_run(run_env)
    original = read_results(run_dir)
    text = (run_dir / "results.json").read_text()
    (run_dir / "results.json").write_text(text[: len(text) // 2])  # truncated (a full disk, a broken copy)
    capsys.readouterr()
    assert main([*argv, "dry_run=true"]) == 0
    assert capsys.readouterr().out.strip() == (f"mbn-train: would resume {run_dir} "
                                               "(unreadable results.json; its checkpoint resumes the run)")
    assert main(argv) == 0
    record = read_results(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert record["status"] == "completed" and [a["resumed_from"] for a in record["attempts"]] == [str(last)]
    assert record["history"] == original["history"] and record["metrics"] == original["metrics"]


def test_a_data_archive_that_is_not_a_tar_says_so_in_the_one_line_summary(tiny, run_env, tmp_path, capsys):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(os.urandom(2048))
    argv = [o for o in tiny() if not o.startswith("data")] + [f"data.source.archive={archive}", "data.train_subset=64",
                                                              "data.batch_size=8", f"paths.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mbn-train: failed")]
    assert "is not a readable tar archive (gzip or plain)" in line and str(archive) in line


def start_sweep(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "mbn.cli.train", *argv], stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_two_identical_sweeps_on_one_dir_train_each_job_once_and_report_the_truth(tiny, run_env, tmp_path):
    # Jobs of 1-2 s each: the second command starts (about 3 s) while the first is still at one of its 4 jobs.
    argv = ["-m", *tiny(epochs=2, data__source__num_train=512), "seed=0,1,2,3", "sweep_name=twice"]
    first = start_sweep(argv, tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while not list(iter_results(run_env)) if run_env.exists() else True:
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    second = start_sweep(argv, tmp_path / "second.log")
    codes = first.wait(300), second.wait(300)
    logs = [(tmp_path / name).read_text() for name in ("first.log", "second.log")]
    assert codes == (0, 0), logs
    runs = sweep_runs(run_env / "sweeps" / "twice")
    assert len(runs) == 4
    for name, record in runs.items():
        assert [a["status"] for a in record["attempts"]] == ["completed"], name  # trained exactly once
    invocations = {record["attempts"][0]["invocation"] for record in runs.values()}
    for log in logs:
        (summary,) = [line for line in log.splitlines() if "sweep done" in line]
        assert "0 failed" in summary and "(of 4 jobs)" in summary, log
        assert "without a final status" not in log
    # Each command counts the jobs it ran as completed and the other's as the other's (running there, or
    # already completed when it planned them).
    ran_by = [sum(1 for r in runs.values() if r["attempts"][0]["invocation"] == inv) for inv in sorted(invocations)]
    assert sum(ran_by) == 4
    for log in logs:
        (summary,) = [line for line in log.splitlines() if "sweep done" in line]
        counts = {part.rsplit(" ", 1)[-1] if "elsewhere" not in part else "elsewhere": int(part.split()[0])
                  for part in summary.split(": ", 2)[-1].split(" (of")[0].split(", ")}
        # A job the other command finished before this one planned it is "skipped" (already completed).
        assert counts["completed"] + counts.get("elsewhere", 0) + counts.get("busy", 0) + counts["skipped"] == 4, summary
        assert counts["completed"] in ran_by, (summary, ran_by)
