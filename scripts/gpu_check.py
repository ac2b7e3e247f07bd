"""The GPU check's steps and report; started by ``scripts/gpu_check.sh``, which picks the Python.

On a machine with one CUDA GPU, in under 8 minutes (a time budget of 7 by default), each step runs
one command of this project's GPU paths, and the check writes a short report to OUT::

    scripts/gpu_check.sh OUT                 # the real check (needs a GPU)
    scripts/gpu_check.sh --dry-run OUT       # CPU: every command composes (tests/scripts/test_gpu_check.py)

Steps (each on its own; a failing step is recorded with the first line of its failure and the
next one runs; the exit code is 1 when any step failed or did not run):

- ``env``: torch sees a CUDA GPU (name, memory, bf16 support); the framework imports.
- ``train_bn``, ``train_mbn``: tiny real ``mbn-train trainer=gpu`` runs (bf16-mixed) on generated data.
- ``sweep_stack4``: ``mbn-train -m ... stack=4``: BN and MBN with 4 seeds each, two stacked packs.
- ``bench_norms``: ``scripts/bench_norms.py --device cuda``: MBN/BN step time at m = 2 and 32.
- ``bench_stack``: ``scripts/bench_stack.py --device cuda``: stacked vs separate runs at m = 2.
- ``train_compile``: ``mbn-train trainer=gpu trainer.compile=true`` (inductor), MBN at m = 8.
- ``train_cifar10``: one MBN run on the real CIFAR-10 archive, only where it is found
  (``--data-root``, else ``$MBN_DATA_ROOT``, ``../shared/data`` or ``shared/data`` of the checkout).

Peak GPU memory: what PyTorch allocated at most in each benchmark (``torch.cuda.max_memory_allocated``)
and the device's most used memory during each step (``nvidia-smi``, sampled every 0.2 s).

With ``--dry-run`` every ``mbn-train`` command runs with ``dry_run=true`` (composed and checked,
nothing trained) and each benchmark runs its exact command with tiny CPU settings appended (the
last value of an option wins), so the check's commands and its report are tested without a GPU.

OUT receives ``report.txt``, ``report.json`` (one entry per step: name, command, status, seconds,
first line of the failure, the parsed numbers) and ``logs.txt`` (each step's output); the runs and
per-step files go to ``--work`` (a new temporary folder by default), so OUT stays three files.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# Steps' time in all, under the 8 minutes the check has (Python start-up and the report take the rest).
DEFAULT_BUDGET_S = 420.0
# A step that would get less time than this is not started.
MIN_STEP_S = 15.0
LOG_TAIL_LINES = 400  # per step, in OUT/logs.txt (the full logs stay in the work folder)
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
STATUS_OK, STATUS_FAILED, STATUS_TIMEOUT = "ok", "failed", "timeout"
STATUS_NOT_RUN, STATUS_SKIPPED = "not_run", "skipped"  # no time left / an optional step that cannot run
FAILING = (STATUS_FAILED, STATUS_TIMEOUT, STATUS_NOT_RUN)

# Generated 32x32 images, width-16 ResNet-18, 2 epochs (MBN's lam > 0 in the second: m < m0 = 32).
TINY_RUN = [
    "data=fake", "data.source.num_train=1024", "data.source.num_test=256", "data.source.image_size=32",
    "model.width=16", "epochs=2", "logger=[csv]",
]
# Appended to a benchmark's GPU command in a dry run: the same command, a few milliseconds of CPU work.
BENCH_NORMS_TINY_CPU = ["--device", "cpu", "--rounds", "1", "--samples-per-round", "2", "--width", "2"]
BENCH_STACK_TINY_CPU = ["--device", "cpu", "--widths", "2", "--steps", "1", "--rounds", "1", "--warmup", "1"]

@dataclass
class Step:
    """One command of the check.

    Args:
        name: the step's name in the report.
        purpose: one line: what it checks.
        argv: the command on a GPU.
        dry_argv: the command of ``--dry-run`` (composed only, or tiny on the CPU).
        timeout_s: the most it may take (less when the budget has less left).
        parse: ``parse(step, log_text, dry_run) -> (numbers, problem)``: the numbers the report shows and,
            when the command exited 0 but did not do what it should, one line saying so.
        expected_runs: mbn-train runs the command trains (or lists in a dry run).
        output_root: mbn-train's ``output_root`` (where the runs' results.json are).
        json_path: the benchmark's ``--json`` file.
        optional: skipped rather than failed when it cannot run (no data, no budget left).
        skip_reason: set when the step is skipped before it starts.
    """

    name: str
    purpose: str
    argv: list[str]
    dry_argv: list[str]
    timeout_s: float
    parse: Callable[["Step", str, bool], tuple[dict[str, Any], str | None]]
    expected_runs: int = 0
    output_root: Path | None = None
    json_path: Path | None = None
    optional: bool = False
    skip_reason: str | None = None


# --- the steps ----------------------------------------------------------------------------------


def find_data_root(explicit: str | None) -> Path | None:
    """The folder holding the real CIFAR-10 archive, or None when none of the usual places has it.

    Args:
        explicit: ``--data-root`` (only that folder is looked at when given).
    """
    candidates = [explicit] if explicit else [
        os.environ.get("MBN_DATA_ROOT"), ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / CIFAR10_ARCHIVE).is_file():
            return Path(candidate).resolve()
    return None


def build_steps(python: str, work: Path, data_root: Path | None) -> list[Step]:
    """The check's steps in the order they run (the most important first: the budget may end the list).

    Args:
        python: the interpreter that has torch and this package's training extra.
        work: where the runs and the benchmarks' JSON go.
        data_root: the folder holding the CIFAR-10 archive, or None (its step is skipped).
    """
    train = [python, "-m", "mbn.cli.train"]

    def train_step(name: str, purpose: str, overrides: list[str], timeout_s: float, multirun: bool = False,
                   expected_runs: int = 1, optional: bool = False) -> Step:
        output_root = work / "runs" / name
        argv = train + (["-m"] if multirun else []) + overrides + [f"output_root={output_root}"]
        return Step(name, purpose, argv, argv + ["dry_run=true"], timeout_s, parse_train,
                    expected_runs=expected_runs, output_root=output_root, optional=optional)

    def bench_step(name: str, purpose: str, script: str, options: list[str], tiny_cpu: list[str],
                   timeout_s: float) -> Step:
        json_path = work / f"{name}.json"
        argv = [python, f"scripts/{script}", *options, "--json", str(json_path)]
        return Step(name, purpose, argv, argv + tiny_cpu, timeout_s, parse_bench, json_path=json_path)

    steps = [
        Step("env", "torch sees a CUDA GPU; the framework imports",
             [python, "scripts/gpu_check.py", "--probe-env", "--require-cuda"],
             [python, "scripts/gpu_check.py", "--probe-env"], 90, parse_env),
        train_step("train_bn", "mbn-train trainer=gpu (bf16-mixed), BN, m=32",
                   ["trainer=gpu", "norm=bn", "data.batch_size=32", *TINY_RUN], 120),
        train_step("train_mbn", "mbn-train trainer=gpu (bf16-mixed), MBN, m=4",
                   ["trainer=gpu", "norm=mbn", "data.batch_size=4", *TINY_RUN], 150),
        train_step("sweep_stack4", "mbn-train -m trainer=gpu stack=4: BN and MBN x 4 seeds as 2 stacked packs, m=8",
                   ["trainer=gpu", "norm=bn,mbn", "seed=0,1,2,3", "stack=4", "data.batch_size=8", *TINY_RUN,
                    "sweep_name=gpu_check_stack4"], 180, multirun=True, expected_runs=8),
        bench_step("bench_norms", "MBN/BN training and eval step time at m=2 and 32 (eager, float32)", "bench_norms.py",
                   ["--device", "cuda", "--norms", "bn", "mbn", "--batch-sizes", "2", "32"], BENCH_NORMS_TINY_CPU, 150),
        bench_step("bench_stack", "stacked (K=4) vs separate throughput at m=2 (eager, float32)", "bench_stack.py",
                   ["--device", "cuda", "--threads", "0", "--norms", "bn", "mbn", "--widths", "16", "64",
                    "--batch-sizes", "2", "--stacks", "1", "4"], BENCH_STACK_TINY_CPU, 150),
        train_step("train_compile", "mbn-train trainer=gpu trainer.compile=true (inductor), MBN, m=8",
                   ["trainer=gpu", "trainer.compile=true", "norm=mbn", "data.batch_size=8", *TINY_RUN], 270),
    ]
    cifar = train_step(
        "train_cifar10", "mbn-train trainer=gpu on the real CIFAR-10 archive (5000 training images), MBN, m=8",
        ["trainer=gpu", "data=cifar10_archive", f"paths.data_root={data_root}", "data.train_subset=5000",
         "data.test_subset=1000", "norm=mbn", "data.batch_size=8", "model.width=16", "epochs=1", "logger=[csv]"],
        180, optional=True)
    if data_root is None:
        cifar.skip_reason = f"no {CIFAR10_ARCHIVE} in --data-root, $MBN_DATA_ROOT, ../shared/data or shared/data"
    steps.append(cifar)
    return steps


# --- parsing what a step did --------------------------------------------------------------------

_MBN_TRAIN_TROUBLE = re.compile(r"^mbn-train: (failed|invalid config|diverged|interrupted|missing dependency|error)")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)?(: |$)")
_ARGPARSE_ERROR = re.compile(r"^\S+: error: ")


def first_failure_line(log_text: str) -> str:
    """The line that says why a command failed: mbn-train's own one-line verdict, else the exception
    a Python traceback ends with, else argparse's error, else the last line the command printed.

    Args:
        log_text: the command's stdout and stderr together.
    """
    lines = [line.rstrip() for line in log_text.splitlines()]
    for line in lines:
        if _MBN_TRAIN_TROUBLE.match(line):
            return line
    if "Traceback (most recent call last):" in lines:
        start = lines.index("Traceback (most recent call last):")
        for line in lines[start + 1:]:
            if line and not line[0].isspace() and _EXCEPTION_LINE.match(line):
                return line
    for line in lines:
        if _ARGPARSE_ERROR.match(line):
            return line
    printed = [line for line in lines if line.strip() and not line.startswith("$ ")]
    return printed[-1] if printed else "(no output)"


def parse_env(step: Step, log_text: str, dry_run: bool) -> tuple[dict[str, Any], str | None]:
    """The probe's JSON line (the GPU and the versions)."""
    for line in reversed(log_text.splitlines()):
        if line.startswith("{"):
            return json.loads(line), None
    return {}, "the probe printed no JSON line"


def _results(output_root: Path) -> list[dict[str, Any]]:
    """Every run's results.json under ``output_root`` (hidden, replaced dirs excluded)."""
    paths = sorted(glob.glob(str(output_root / "**" / "results.json"), recursive=True))
    return [json.loads(Path(path).read_text()) for path in paths]


def _run_numbers(result: dict[str, Any]) -> dict[str, Any]:
    history = result.get("history") or [{}]
    trainer = result.get("config", {}).get("trainer", {})
    return {
        "run": result.get("run_name"),
        "status": result.get("status"),
        "epochs_completed": result.get("epochs_completed"),
        "final_test_acc1": (result.get("metrics") or {}).get("final_test_acc1"),
        "final_train_loss": history[-1].get("train_loss"),
        "last_epoch_lam": history[-1].get("lam"),
        "wall_time_s": result.get("wall_time_s"),
        "precision": trainer.get("precision"),
        "compile": trainer.get("compile"),
        "error": result.get("error"),
    }


def parse_train(step: Step, log_text: str, dry_run: bool) -> tuple[dict[str, Any], str | None]:
    """mbn-train: in a dry run, the jobs it lists; else each run's results.json and whether Lightning used the GPU."""
    if dry_run:
        planned = [line for line in log_text.splitlines() if line.startswith("mbn-train: would start")]
        packs = [line for line in log_text.splitlines() if line.startswith("mbn-train: would stack")]
        numbers = {"planned_runs": len(planned), "stacked_packs": len(packs)}
        if len(planned) != step.expected_runs:
            return numbers, f"the dry run listed {len(planned)} runs to start, expected {step.expected_runs}"
        return numbers, None
    assert step.output_root is not None
    runs = [_run_numbers(result) for result in _results(step.output_root)]
    used = re.search(r"GPU available: (\w+)[^,]*, used: (\w+)", log_text)
    numbers = {"gpu_used": None if used is None else used.group(2) == "True", "runs": runs}
    completed = sum(run["status"] == "completed" for run in runs)
    problem = None if completed == step.expected_runs else f"{completed} of {step.expected_runs} runs completed"
    return numbers, problem


def parse_bench(step: Step, log_text: str, dry_run: bool) -> tuple[dict[str, Any], str | None]:
    """The benchmark's JSON, with the ratios the check is for picked out."""
    assert step.json_path is not None
    if not step.json_path.is_file():
        return {}, f"{step.json_path.name} was not written"
    record = json.loads(step.json_path.read_text())
    rows = record["rows"]
    if step.name == "bench_norms":
        summary = {f"mbn_bn_{mode}_ratio_m{row['batch_size']}": row[f"{mode}_ratio"]
                   for row in rows if row["norm"] == "mbn" for mode in ("train", "eval")}
    else:
        summary = {f"stacked_separate_ratio_{row['norm']}_w{row['width']}_m{row['batch_size']}_k{row['stack']}":
                   row["ratio"] for row in rows}
    peak = record["peak_gpu_memory_allocated_mib"]
    return {"device": record["device"], "summary": summary, "peak_gpu_memory_allocated_mib": peak, "rows": rows}, None


# --- running ------------------------------------------------------------------------------------


class MemorySampler:
    """The most GPU memory in use (MiB, whole device) while a step runs, from ``nvidia-smi -lms``.

    Args:
        log_path: where nvidia-smi's samples go.
        enabled: sample at all (not in a dry run); nothing is sampled where nvidia-smi is missing.
    """

    def __init__(self, log_path: Path, enabled: bool) -> None:
        self.log_path = log_path
        self.enabled = enabled
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "MemorySampler":
        nvidia_smi = shutil.which("nvidia-smi")
        if self.enabled and nvidia_smi is not None:
            with open(self.log_path, "w") as out:
                query = [nvidia_smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
                self.process = subprocess.Popen(query, stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    @property
    def peak_mib(self) -> int | None:
        if self.process is None:
            return None
        values = [int(line) for line in self.log_path.read_text().split() if line.isdigit()]
        return max(values) if values else None


def run_command(argv: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run ``argv`` from the repository root, its output into ``log_path``.

    Returns:
        (exit code, or None when it ran past ``timeout_s`` and was killed; seconds it took).
    """
    # The checkout's mbn first, also for scripts/*.py (whose own folder is their sys.path[0]).
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=python_path, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        start = time.monotonic()
        # Its own process group: a timeout ends the command with every process it started (compile workers).
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            code: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # what it left behind, or all of it on a timeout
            except ProcessLookupError:
                pass
            process.wait()
    return code, time.monotonic() - start


def run_step(step: Step, work: Path, dry_run: bool, remaining_s: float) -> dict[str, Any]:
    """Run one step and return its report entry."""
    argv = step.dry_argv if dry_run else step.argv
    entry: dict[str, Any] = {
        "name": step.name, "purpose": step.purpose, "command": shlex.join(argv), "gpu_command": shlex.join(step.argv),
        "status": None, "seconds": 0.0, "exit_code": None, "failure": None, "numbers": {}, "peak_gpu_memory_used_mib": None,
    }
    if step.skip_reason is not None:
        return entry | {"status": STATUS_SKIPPED, "failure": step.skip_reason}
    timeout_s = min(step.timeout_s, remaining_s)
    if timeout_s < MIN_STEP_S:
        status = STATUS_SKIPPED if step.optional else STATUS_NOT_RUN
        return entry | {"status": status, "failure": f"not run: {remaining_s:.0f} s of the time budget left"}
    log_path = work / "logs" / f"{step.name}.log"
    with MemorySampler(work / "logs" / f"{step.name}.memory", enabled=not dry_run) as sampler:
        code, seconds = run_command(argv, log_path, timeout_s)
    log_text = log_path.read_text(errors="replace")
    entry.update(seconds=round(seconds, 1), exit_code=code, peak_gpu_memory_used_mib=sampler.peak_mib)
    if code is None:
        failure = f"timed out after {timeout_s:.0f} s; last line: {first_failure_line(log_text)}"
        return entry | {"status": STATUS_TIMEOUT, "failure": failure}
    try:
        numbers, problem = step.parse(step, log_text, dry_run)
    except (OSError, ValueError, KeyError) as exc:  # a report that cannot be read is the step's failure too
        numbers, problem = {}, f"could not read what the step wrote: {type(exc).__name__}: {exc}"
    entry["numbers"] = numbers
    if code != 0:
        return entry | {"status": STATUS_FAILED, "failure": first_failure_line(log_text)}
    if problem is not None:
        return entry | {"status": STATUS_FAILED, "failure": problem}
    return entry | {"status": STATUS_OK}


# --- the env step's probe (run as its own process: `gpu_check.py --probe-env`) ------------------


def probe_env(require_cuda: bool) -> int:
    """Print one JSON line (Python, torch, the GPU, the framework's versions) and return the exit code:
    1, with one line per problem, when ``mbn.cli.train`` cannot be imported (the training extra is
    missing) or, with ``require_cuda``, when torch sees no CUDA GPU.

    Args:
        require_cuda: a machine without a usable CUDA GPU fails the probe.
    """
    import importlib.metadata

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
    }
    for name in ("pytorch-lightning", "hydra-core", "omegaconf", "torchvision"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_mib=props.total_memory // 2**20, bf16_supported=torch.cuda.is_bf16_supported())
    import mbn

    info["mbn"] = mbn.__file__
    try:
        import mbn.cli.train  # noqa: F401
    except ModuleNotFoundError as exc:
        info["missing_module"] = exc.name
    print(json.dumps(info), flush=True)
    problems = []
    if require_cuda and not info["cuda_available"]:
        problems.append(f"CUDA is not available: torch {torch.__version__} (built with CUDA {torch.version.cuda}) sees "
                        f"{torch.cuda.device_count()} devices")
    if "missing_module" in info:
        problems.append(f"mbn-train cannot start: no module named {info['missing_module']!r} "
                        "(install mbn's training extra)")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


# --- the report ---------------------------------------------------------------------------------


def _result_line(entry: dict[str, Any]) -> str:
    """The report's one-line summary of what a step measured."""
    numbers = entry["numbers"]
    if entry["status"] in (STATUS_SKIPPED, STATUS_NOT_RUN) or not numbers:
        return ""
    if entry["name"] == "env":
        missing = f"; missing module {numbers['missing_module']!r}" if "missing_module" in numbers else ""
        if not numbers.get("cuda_available"):
            return f"torch {numbers.get('torch')}, no CUDA device{missing}"
        bf16 = "yes" if numbers["bf16_supported"] else "no"
        return (f"{numbers['gpu']} ({numbers['gpu_memory_mib']} MiB, sm {numbers['capability']}, bf16 {bf16}), "
                f"torch {numbers['torch']} (CUDA {numbers['torch_cuda']}){missing}")
    if "planned_runs" in numbers:
        packs = f" in {numbers['stacked_packs']} stacked packs" if numbers["stacked_packs"] else ""
        return f"dry run: {numbers['planned_runs']} runs would start{packs}"
    if "runs" in numbers:
        runs = numbers["runs"]
        completed = [run for run in runs if run["status"] == "completed"]
        accs = ", ".join(f"{run['final_test_acc1']:.3f}" for run in completed if run["final_test_acc1"] is not None)
        first = runs[0] if runs else {}
        return (f"{len(completed)}/{len(runs)} runs completed ({first.get('precision')}, "
                f"GPU used: {numbers['gpu_used']}); final test acc1 {accs or '-'}")
    rows = numbers.get("rows", [])
    if entry["name"] == "bench_norms":
        mbn = [row for row in rows if row["norm"] == "mbn"]
        train = ", ".join(f"m={row['batch_size']} {row['train_ratio']:.2f}" for row in mbn)
        evaluation = ", ".join(f"m={row['batch_size']} {row['eval_ratio']:.2f}" for row in mbn)
        return f"MBN/BN step time, train: {train}; eval: {evaluation}"
    return "stacked/separate img/s: " + ", ".join(
        f"{row['norm']} w{row['width']} m={row['batch_size']} K={row['stack']} {row['ratio']:.2f}" for row in rows)


def write_report(out: Path, entries: list[dict[str, Any]], meta: dict[str, Any], work: Path) -> None:
    """OUT/report.json, OUT/report.txt and OUT/logs.txt."""
    (out / "report.json").write_text(json.dumps({**meta, "steps": entries}, indent=1) + "\n")
    lines = [
        f"mbn GPU check, {meta['finished_at']}, "
        + ("DRY RUN (commands composed only, benchmarks tiny on the CPU)" if meta["dry_run"] else "on the GPU"),
        f"commit {meta['commit']}, python {meta['python']} on {meta['host']}; runs and full logs in {meta['work']}",
        f"{meta['failed']} of {len(entries)} steps failed or did not run; {meta['seconds']:.0f} s in all",
        "",
        f"{'step':<14} {'status':<8} {'seconds':>7} {'peak MiB':>8}  result",
    ]
    for entry in entries:
        peak = "-" if entry["peak_gpu_memory_used_mib"] is None else entry["peak_gpu_memory_used_mib"]
        lines.append(f"{entry['name']:<14} {entry['status']:<8} {entry['seconds']:>7.1f} {peak:>8}  {_result_line(entry)}")
    allocated = {entry["name"]: entry["numbers"].get("peak_gpu_memory_allocated_mib") for entry in entries}
    allocated = {name: value for name, value in allocated.items() if value is not None}
    if allocated:
        lines.append("peak GPU memory allocated by PyTorch: "
                     + ", ".join(f"{name} {value:.0f} MiB" for name, value in allocated.items()))
    lines.append("(peak MiB: the device's most used memory while the step ran, nvidia-smi)")
    problems = [entry for entry in entries if entry["failure"]]
    if problems:
        lines += ["", "failures and skips (first line):"]
        lines += [f"  {entry['name']} [{entry['status']}]: {entry['failure']}" for entry in problems]
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    with open(out / "logs.txt", "w") as logs:
        for entry in entries:
            log_path = work / "logs" / f"{entry['name']}.log"
            logs.write(f"===== {entry['name']} [{entry['status']}] =====\n")
            if not log_path.is_file():
                logs.write(f"(not run) $ {entry['command']}\n\n")
                continue
            text = log_path.read_text(errors="replace").splitlines()
            if len(text) > LOG_TAIL_LINES + 1:
                text = text[:1] + [f"... ({len(text) - LOG_TAIL_LINES - 1} lines left out)"] + text[-LOG_TAIL_LINES:]
            logs.write("\n".join(text) + "\n\n")


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="folder for report.txt, report.json and logs.txt (created)")
    parser.add_argument("--dry-run", action="store_true", help="only check that every command composes (CPU)")
    parser.add_argument("--work", type=Path, help="folder for the runs and per-step files (default: a new temporary one)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for all steps (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--only", help="comma-separated step names to run (default: all)")
    parser.add_argument("--data-root", help=f"folder holding {CIFAR10_ARCHIVE} (default: the usual places)")
    parser.add_argument("--probe-env", action="store_true", help="(the env step) print the GPU and versions as JSON")
    parser.add_argument("--require-cuda", action="store_true", help="with --probe-env: fail when torch sees no CUDA GPU")
    args = parser.parse_args(argv)
    if args.probe_env:
        return probe_env(args.require_cuda)
    if args.out is None:
        parser.error("the folder for the report (OUT) is required")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="mbn-gpu-check-")))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    steps = build_steps(sys.executable, work, find_data_root(args.data_root))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {step.name for step in steps})
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(step.name for step in steps)}")
        steps = [step for step in steps if step.name in wanted]

    started = time.monotonic()
    entries = []
    for step in steps:
        entry = run_step(step, work, args.dry_run, args.budget - (time.monotonic() - started))
        print(f"gpu_check: {entry['name']}: {entry['status']} ({entry['seconds']:.1f} s)"
              + (f": {entry['failure']}" if entry["failure"] else ""), flush=True)
        entries.append(entry)
    failed = sum(entry["status"] in FAILING for entry in entries)
    meta = {
        "dry_run": args.dry_run,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "commit": _commit(),
        "python": sys.executable,
        "host": platform.node(),
        "work": str(work),
        "failed": failed,
    }
    write_report(out, entries, meta, work)
    print((out / "report.txt").read_text(), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
