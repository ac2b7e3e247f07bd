"""``mbn-train`` end to end: real Hydra composition, real Lightning runs, real files (tiny sizes)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runner import mbn_train as main
from numerics import assert_close_normwise
from wandb_records import read_finished_wandb_records, wandb_history

from mbn.nn import NORM_NAMES, schedule
from mbn.results import config_hash, iter_results, read_results
from mbn.train.job import prepare_output_dir

CIFAR10_ARCHIVE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def only_run_dir(root: Path) -> Path:
    paths = list(iter_results(root))
    assert len(paths) == 1, paths
    return paths[0].parent


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_one_epoch_per_norm_on_fake_data(norm, tiny, run_env, capsys):
    extra = {"norm": norm}
    if norm == "gn":
        extra["norm.num_groups"] = 2
    overrides = tiny(**extra)
    assert main(overrides) == 0
    run_dir = only_run_dir(run_env)
    assert run_dir.parent == run_env / "runs"
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["error"] is None
    assert results["norm"] == norm and results["config"]["norm"]["name"] == norm
    assert results["config_hash"] == config_hash(results["config"])
    assert (results["batch_size"], results["world_size"], results["global_batch_size"]) == (8, 1, 8)
    assert results["lr"] == pytest.approx(0.1 * 8 / 64)
    assert results["epochs"] == results["epochs_completed"] == len(results["history"]) == 1
    row = results["history"][0]
    assert 0.0 <= row["test_acc1"] <= row["test_acc5"] <= 1.0 and row["train_loss"] > 0
    assert row["val_acc1"] is None and results["metrics"]["final_val_acc1"] is None  # no validation split
    assert results["metrics"]["final_test_acc1"] == results["metrics"]["best_epoch_test_acc1"] == row["test_acc1"]
    assert results["wall_time_s"] > 0 and results["finished_at"] is not None
    if norm == "mbn":  # T = 1: the only epoch is the last one, lam = 1 - m/m0
        assert row["lam"] == pytest.approx(schedule.lam(1, 1, 8, 32)) == pytest.approx(0.75)
        assert row["tau"] == pytest.approx(schedule.tau(8, 32, 0.9))
    else:
        assert row["lam"] is None and row["tau"] is None
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    assert any(r.get("test/acc1") for r in logged) and any(r.get("train/loss") for r in logged)
    assert not any(r.get("val/acc1") for r in logged)
    assert f"mbn-train: completed {run_dir}" in capsys.readouterr().out


def test_run_on_a_slice_of_the_real_cifar10_archive(run_env):
    assert CIFAR10_ARCHIVE.is_file(), "the real CIFAR-10 archive is part of this project's environment"
    overrides = [
        "data=cifar10_archive", f"data.source.archive={CIFAR10_ARCHIVE}", "data.train_subset=80",
        "data.test_subset=100", "data.val_subset=50", "data.batch_size=8", "data.eval_batch_size=100", "model.width=4",
        "norm=mbn", "epochs=1", "trainer.num_threads=1", f"output_root={run_env}",
    ]
    assert main(overrides) == 0
    results = read_results(only_run_dir(run_env))
    assert results["status"] == "completed" and results["dataset"] == "cifar10_archive"
    assert results["config"]["data"]["train_subset"] == 80
    metrics = results["metrics"]
    assert 0.0 <= metrics["final_test_acc1"] <= 1.0 and metrics["final_test_acc5"] is not None
    # The 50 held-out training images are the validation split: counted in steps of 1/50.
    assert 0.0 <= metrics["final_val_acc1"] <= 1.0 and (metrics["final_val_acc1"] * 50) == pytest.approx(round(metrics["final_val_acc1"] * 50))
    assert metrics["best_epoch"] == 1 and metrics["best_val_acc1"] == metrics["final_val_acc1"]


def test_multirun_sweep_writes_one_result_per_job_and_rerun_skips_them(tiny, run_env, capsys):
    argv = ["-m", *tiny(), "norm=bn,mbn", "data.batch_size=4,8", "sweep_name=grid"]
    assert main(argv) == 0
    paths = list(iter_results(run_env / "sweeps" / "grid"))
    assert len(paths) == 4 and len({p.parent for p in paths}) == 4
    runs = {(r["norm"], r["batch_size"]): r for r in map(read_results, paths)}
    assert set(runs) == {("bn", 4), ("bn", 8), ("mbn", 4), ("mbn", 8)}
    assert all(r["status"] == "completed" and r["sweep_name"] == "grid" for r in runs.values())
    assert len({r["config_hash"] for r in runs.values()}) == 4
    assert runs[("mbn", 4)]["lr"] == pytest.approx(0.1 * 4 / 64)
    assert "sweep done: 4 completed, 0 failed, 0 skipped (of 4 jobs)" in capsys.readouterr().out

    started = {p: read_results(p)["started_at"] for p in paths}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("mbn-train: skipped") == 4 and "sweep done: 0 completed, 0 failed, 4 skipped (of 4 jobs)" in out
    assert {p: read_results(p)["started_at"] for p in paths} == started


def test_output_dirs_are_deterministic_and_named_by_overrides(tiny, run_env):
    assert main([*tiny(), "seed=3"]) == 0
    run_dir = only_run_dir(run_env)
    assert "seed=3" in run_dir.name and "output_root" not in run_dir.name
    assert read_results(run_dir)["seed"] == 3


def test_nan_loss_stops_the_run_as_diverged(tiny, run_env, capsys):
    code = main(tiny(**{"optim.base_lr": 1e12, "epochs": 5, "trainer.check_finite_every_n_steps": 1}))
    results = read_results(only_run_dir(run_env))
    assert code == 3 and results["status"] == "diverged"
    assert results["epochs_completed"] < 5
    assert results["error"].startswith("DivergedError: non-finite training loss")
    assert "diverged" in capsys.readouterr().out


def test_exception_during_the_run_is_recorded_as_failed(tiny, run_env):
    code = main(tiny(**{"data.source.num_classes": 1}))  # the fake-data generator rejects one class
    results = read_results(only_run_dir(run_env))
    assert code == 1 and results["status"] == "failed"
    assert "num_classes must be at least 2" in results["error"]
    assert "Traceback" in results["traceback"] and "load_fake" in results["traceback"]


def test_wandb_offline_run_files_contain_the_metrics(tiny, run_env):
    assert main(tiny(logger="[csv,wandb]", norm="mbn", epochs=2, sweep_name="wb")) == 0
    run_dir = only_run_dir(run_env)
    results = read_results(run_dir)
    (offline_run,) = run_dir.glob("wandb/offline-run-*")
    (run_file,) = offline_run.glob("run-*.wandb")
    records = read_finished_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "wb" and run.job_type == "train" and run.display_name == run_dir.name
    assert {"norm=mbn", "m=8", "model=resnet18", "data=fake"} <= set(run.tags)
    logged = wandb_history(records)
    assert logged["test/acc1"] == pytest.approx([row["test_acc1"] for row in results["history"]])
    assert logged["train/loss"] == pytest.approx([row["train_loss"] for row in results["history"]], rel=1e-6)
    assert logged["mbn/lam"] == pytest.approx([0.0, 0.75])
    assert logged["lr"] == pytest.approx([row["lr"] for row in results["history"]], rel=1e-6)
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_a_crashed_run_still_finishes_its_wandb_run(tiny, run_env):
    assert main(tiny(logger="[csv,wandb]", **{"optim.base_lr": 1e12, "epochs": 3})) == 3
    (run_file,) = run_env.glob("runs/*/wandb/offline-run-*/run-*.wandb")
    (exit_record,) = [r.exit for r in read_finished_wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1


def test_a_completed_dir_of_another_config_is_moved_aside(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"old")
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "config_hash": "aaaa"}))
    assert prepare_output_dir(run_dir, "aaaa") == "completed"
    assert prepare_output_dir(run_dir, "bbbb") is None
    assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints").exists()
    assert (run_dir / ".replaced" / "aaaa" / "checkpoints" / "last.ckpt").read_bytes() == b"old"
    assert list(iter_results(tmp_path)) == []  # hidden dirs are not part of a sweep


# --- interruption and resume --------------------------------------------------------------------

RESUME_OVERRIDES = {"data.source.num_train": 256, "epochs": 2, "norm": "mbn", "data.eval_batch_size": 32}


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["state_dict"]


def wait_for_first_epoch(run_root: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    """Wait until epoch 1 is recorded and its checkpoint fully written; returns the run dir."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for path in iter_results(run_root) if run_root.exists() else ():
            try:
                if read_results(path)["epochs_completed"] >= 1:
                    torch.load(path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                    return path.parent
            except (OSError, ValueError, RuntimeError, EOFError, json.JSONDecodeError):
                pass  # still being written
        time.sleep(0.05)
    raise AssertionError("the run did not finish its first epoch in time")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_to_the_same_weights(signum, tiny, run_env, tmp_path):
    reference_root = tmp_path / "reference"
    overrides = tiny(**RESUME_OVERRIDES)
    assert main([*overrides, f"output_root={reference_root}"]) == 0
    reference = read_results(only_run_dir(reference_root))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The run waits when epoch 2 starts (debug.hold_at_epoch, not part of its config), so the signal
    # lands at a known point however loaded the machine is.
    # SIGINT's default disposition, as in a terminal: a shell's background job (CI launched with `&`)
    # ignores SIGINT, and the child would inherit that and never stop.
    proc = subprocess.Popen([sys.executable, "-m", "mbn.cli.train", *overrides, "debug.hold_at_epoch=2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        run_dir = wait_for_first_epoch(run_env, proc)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted = read_results(run_dir)
    assert proc.returncode == 130, output
    assert interrupted["status"] == "interrupted" and interrupted["epochs_completed"] == 1, output
    assert interrupted["finished_at"] is not None

    assert main(overrides) == 0  # the same command again: resumes from last.ckpt
    resumed = read_results(run_dir)
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("last.ckpt")
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
    for key in ("test_acc1", "test_loss", "train_loss", "lam"):
        assert [row[key] for row in resumed["history"]] == [row[key] for row in reference["history"]]
    expected, actual = final_state(only_run_dir(reference_root)), final_state(run_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.torch_compile
@pytest.mark.numerics
def test_compiled_model_trains_like_the_eager_one_with_the_same_checkpoint_keys(tiny, run_env, monkeypatch):
    from torch._dynamo.utils import counters

    # aot_eager traces forward and backward through dynamo and AOTAutograd as inductor does, without its
    # C++ compiling (40 s of this test): inductor's kernels for MBN are checked in tests/nn/test_compile.py.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile_module(self, backend="aot_eager", **kwargs))
    torch._dynamo.reset()
    states, graphs = {}, {}
    for compile_model in (False, True):
        counters.clear()
        # VGG-11, width 8: at width 4 a near-degenerate BN channel amplifies last-bit differences to 5e-2
        # (and inductor's AVX2 kernels for 4-channel convolutions corrupted the heap on this project's CPU:
        # torch 2.14.1, "realloc(): invalid next size" in the compiled backward).
        assert main(tiny(norm="mbn", model="vgg11", model__width=8, **{"trainer.compile": compile_model})) == 0
        graphs[compile_model] = counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] >= 1
    for path in iter_results(run_env):
        compile_model = read_results(path)["config"]["trainer"]["compile"]
        ckpt = torch.load(path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        states[compile_model] = ckpt["state_dict"]
    eager, compiled = states[False], states[True]
    assert list(compiled) == list(eager)  # in-place compile: no "_orig_mod." prefixes in checkpoints
    # Compiled kernels compute eager's float32 numbers in another order, and 8 SGD steps carry the
    # difference on: per tensor, norm-wise, within 3e3 * steps * eps(float32) (tests/numerics.py; the
    # stacked sweeps' measured growth, 3.6e2, with a margin of 8).
    assert_close_normwise(compiled, eager, dtype=torch.float32, steps=8, growth=3e3, what="weights")


def test_a_signal_stops_a_joblib_sweep_that_runs_one_job_at_a_time(tiny, run_env):
    """joblib with n_jobs=1 runs the jobs in the command's own process (as the studies' commands do):
    an interrupted job stops the sweep there, as under Hydra's basic launcher; the next job never starts."""
    overrides = tiny(**{**RESUME_OVERRIDES, "norm": "bn,mbn"})
    proc = subprocess.Popen([sys.executable, "-m", "mbn.cli.train", "-m", *overrides, "hydra/launcher=parallel",
                             "hydra.launcher.n_jobs=1", "debug.hold_at_epoch=2"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = wait_for_first_epoch(run_env, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert read_results(run_dir)["status"] == "interrupted"
    assert [path.parent for path in iter_results(run_env)] == [run_dir], output  # the second job never started
