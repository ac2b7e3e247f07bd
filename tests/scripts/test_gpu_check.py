"""scripts/gpu_check.sh on the CPU: every command of the GPU check composes (``--dry-run``), and a real
run where torch sees no GPU records each failing step with the first line of its failure.

No GPU is needed: the dry run runs every ``mbn-train`` command with ``dry_run=true`` and each
benchmark's GPU command with tiny CPU settings appended; the failing run hides any GPU
(``CUDA_VISIBLE_DEVICES=""``), so its steps fail on every machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mbn.cli.config import CONFIG_DIR
from mbn.cli.schema import register_schemas

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "train_bn", "train_mbn", "sweep_stack4", "bench_norms", "bench_stack", "train_compile", "train_cifar10"]
TRAIN_STEPS = ["train_bn", "train_mbn", "sweep_stack4", "train_compile", "train_cifar10"]
MBN_TRAIN = [sys.executable, "-m", "mbn.cli.train"]


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``scripts/gpu_check.sh ARGS`` with this interpreter as its Python."""
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHON=sys.executable, **env))


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def steps_by_name(report: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in report["steps"]}


@pytest.mark.slow
def test_the_dry_run_composes_every_command_and_reports_each_step(tmp_path):
    """One dry run (8 processes, about half a minute of CPU time), checked by the helpers below."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "cifar10-jpeg.tar.gz").write_bytes(b"")  # a dry run checks only that the archive exists
    out = tmp_path / "out"
    done = gpu_check("--dry-run", str(out), "--work", str(tmp_path / "work"), "--data-root", str(data_root))
    assert done.returncode == 0, done.stdout + done.stderr
    report, text = json.loads((out / "report.json").read_text()), (out / "report.txt").read_text()
    check_every_step_ran(report, text, (out / "logs.txt").read_text())
    check_training_steps_are_bf16_gpu_runs_listing_each_job(steps_by_name(report))
    check_benchmarks_ran_their_gpu_commands_tiny_on_the_cpu(steps_by_name(report), text)
    check_env_step_saw_this_interpreter_and_the_checkouts_package(steps_by_name(report)["env"]["numbers"])


def check_every_step_ran(report: dict, text: str, logs: str) -> None:
    assert report["dry_run"] is True and report["failed"] == 0
    assert [entry["name"] for entry in report["steps"]] == STEPS
    outcomes = [(entry["status"], entry["exit_code"], entry["failure"]) for entry in report["steps"]]
    assert outcomes == [("ok", 0, None)] * len(STEPS)
    for entry in report["steps"]:
        assert entry["seconds"] > 0 and entry["peak_gpu_memory_used_mib"] is None
        assert re.search(rf"^{entry['name']} +ok ", text, re.MULTILINE)
        assert f"===== {entry['name']} [ok] =====\n$ {entry['command']}\n" in logs
    run_files = [path for path in (Path(report["work"]) / "runs").rglob("*") if path.is_file()]
    assert run_files == [], "a dry run writes no run files"


def check_training_steps_are_bf16_gpu_runs_listing_each_job(steps: dict[str, dict]) -> None:
    register_schemas()
    for name in TRAIN_STEPS:
        gpu_argv = shlex.split(steps[name]["gpu_command"])
        assert gpu_argv[:3] == MBN_TRAIN and "trainer=gpu" in gpu_argv
        assert shlex.split(steps[name]["command"]) == gpu_argv + ["dry_run=true"]
        overrides = [arg for arg in gpu_argv[3:] if arg != "-m"]
        if name == "sweep_stack4":  # one job of the sweep: Hydra's compose API takes no sweep values
            overrides = [arg.split(",")[0] for arg in overrides]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            trainer = OmegaConf.to_container(compose(config_name="train", overrides=overrides).trainer)
        assert (trainer["accelerator"], trainer["precision"], trainer["devices"]) == ("gpu", "bf16-mixed", 1)
        assert trainer["compile"] is (name == "train_compile")
        planned = steps[name]["numbers"]
        jobs, packs = (8, 2) if name == "sweep_stack4" else (1, 0)
        assert planned == {"planned_runs": jobs, "stacked_packs": packs}
    sweep = shlex.split(steps["sweep_stack4"]["gpu_command"])
    assert {"-m", "stack=4", "norm=bn,mbn", "seed=0,1,2,3"} <= set(sweep)
    assert "norm=bn" in shlex.split(steps["train_bn"]["gpu_command"])
    assert "norm=mbn" in shlex.split(steps["train_mbn"]["gpu_command"])


def check_benchmarks_ran_their_gpu_commands_tiny_on_the_cpu(steps: dict[str, dict], text: str) -> None:
    norms, stacked = steps["bench_norms"], steps["bench_stack"]
    for entry in (norms, stacked):
        gpu_argv = shlex.split(entry["gpu_command"])
        assert gpu_argv[gpu_argv.index("--device") + 1] == "cuda"
        argv = shlex.split(entry["command"])
        assert argv[: len(gpu_argv)] == gpu_argv and argv[len(gpu_argv):][:2] == ["--device", "cpu"]
        assert entry["numbers"]["device"] == "cpu" and entry["numbers"]["peak_gpu_memory_allocated_mib"] is None
    rows = norms["numbers"]["rows"]
    assert sorted((row["batch_size"], row["norm"]) for row in rows) == [(2, "bn"), (2, "mbn"), (32, "bn"), (32, "mbn")]
    assert all(row["train_ms"] > 0 and row["eval_ms"] > 0 for row in rows)
    assert all(row["train_ratio"] == 1.0 and row["eval_ratio"] == 1.0 for row in rows if row["norm"] == "bn")
    mbn_rows = {row["batch_size"]: row for row in rows if row["norm"] == "mbn"}
    assert norms["numbers"]["summary"] == {
        f"mbn_bn_{mode}_ratio_m{m}": mbn_rows[m][f"{mode}_ratio"] for m in (2, 32) for mode in ("train", "eval")}
    rows = stacked["numbers"]["rows"]
    assert sorted((row["norm"], row["batch_size"], row["stack"]) for row in rows) == [
        ("bn", 2, 1), ("bn", 2, 4), ("mbn", 2, 1), ("mbn", 2, 4)]
    assert all(row["separate_img_per_s"] > 0 and row["stacked_img_per_s"] > 0 and row["ratio"] > 0 for row in rows)
    assert "MBN/BN step time, train: m=2 " in text and "stacked/separate img/s: bn w2 m=2 K=1 " in text


def check_env_step_saw_this_interpreter_and_the_checkouts_package(env: dict) -> None:
    assert env["torch"] == torch.__version__ and env["cuda_available"] == torch.cuda.is_available()
    assert Path(env["mbn"]) == ROOT / "mbn" / "__init__.py" and "missing_module" not in env


@pytest.mark.slow
def test_without_a_gpu_each_step_fails_with_its_first_line_and_the_check_goes_on(tmp_path):
    out = tmp_path / "out"
    done = gpu_check(str(out), "--work", str(tmp_path / "work"), "--only", "env,train_bn,bench_norms",
                     CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    steps = steps_by_name(report)
    assert list(steps) == ["env", "train_bn", "bench_norms"] and report["failed"] == 3
    assert [entry["status"] for entry in steps.values()] == ["failed"] * 3
    assert all(entry["exit_code"] not in (0, None) for entry in steps.values())
    assert steps["env"]["failure"].startswith("CUDA is not available: torch ")
    # mbn-train's own one-line verdict, and the run's record says the same
    assert steps["train_bn"]["failure"].startswith("mbn-train: failed ")
    (run,) = steps["train_bn"]["numbers"]["runs"]
    assert run["status"] == "failed" and run["error"] in steps["train_bn"]["failure"]
    # the exception a traceback ends with, not the traceback's first line
    assert re.match(r"^\w+Error: ", steps["bench_norms"]["failure"]), steps["bench_norms"]["failure"]
    text = (out / "report.txt").read_text()
    assert "3 of 3 steps failed or did not run" in text
    for name, entry in steps.items():
        assert f"  {name} [failed]: {entry['failure']}\n" in text


def test_out_of_budget_steps_are_not_run_and_fail_the_check(tmp_path):
    done = gpu_check("--dry-run", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget", "0",
                     "--data-root", str(tmp_path))
    assert done.returncode == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    statuses = {entry["name"]: entry["status"] for entry in report["steps"]}
    # the CIFAR-10 run is optional, and no archive is in --data-root: skipped, not failed
    assert statuses == {name: "skipped" if name == "train_cifar10" else "not_run" for name in STEPS}
    assert list((tmp_path / "work" / "logs").iterdir()) == []


def test_a_timed_out_command_is_killed_with_every_process_it_started(tmp_path):
    driver = load_driver()
    pid_file = tmp_path / "pid"
    command = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    code, seconds = driver.run_command(command, tmp_path / "log", timeout_s=5)
    assert code is None and 5 <= seconds < 30
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def sleeping() -> bool:  # gone, or a zombie waiting for its new parent to reap it, is not
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while sleeping() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sleeping()


def test_the_first_failure_line_is_the_exception_even_with_output_after_its_traceback(tmp_path):
    driver = load_driver()
    program = "import atexit; atexit.register(print, 'shutting down'); print('working'); raise ValueError('bad value')"
    code, _ = driver.run_command([sys.executable, "-c", program], tmp_path / "log", timeout_s=60)
    log = (tmp_path / "log").read_text()
    assert code == 1 and log.rstrip().endswith("shutting down")
    assert driver.first_failure_line(log) == "ValueError: bad value"


def test_bad_arguments_stop_with_one_line(tmp_path):
    done = gpu_check(str(tmp_path / "out"), "--only", "env,nosuch")
    assert done.returncode == 2 and "unknown step(s) nosuch; steps: env, train_bn," in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(tmp_path / "no-python")))
    assert done.returncode == 2 and done.stderr == f"gpu_check: no Python at PYTHON={tmp_path / 'no-python'}\n"
