"""What a rerun does with a job's dir (``mbn.train.job``): every case of the plan, and the lock."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from mbn.train.job import find_same_config, plan_job, prepare_output_dir
from mbn.train.run_dir import JobBusy, is_locked, job_lock


def write_run(run_dir, status="completed", config_hash="aaaa", epochs=2, checkpoint=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({"status": status, "config_hash": config_hash, "epochs_completed": epochs}))
    if checkpoint:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")


@pytest.mark.parametrize(
    "status, checkpoint, rerun_diverged, action, reason",
    [
        ("completed", True, False, "skip", "completed"),
        ("diverged", True, False, "skip", "diverged (final; rerun_diverged=true restarts it)"),
        ("diverged", True, True, "replace", "diverged, rerun_diverged=true"),
        ("running", True, False, "resume", "killed after epoch 2"),
        ("interrupted", True, False, "resume", "interrupted after epoch 2"),
        ("failed", True, False, "resume", "failed after epoch 2"),
        ("failed", False, False, "start", "failed before its first checkpoint"),
    ],
)
def test_plan_of_a_run_of_the_same_config(tmp_path, status, checkpoint, rerun_diverged, action, reason):
    write_run(tmp_path / "run", status=status, checkpoint=checkpoint)
    plan = plan_job(tmp_path / "run", "aaaa", rerun_diverged=rerun_diverged)
    assert (plan.action, plan.reason, plan.previous_status) == (action, reason, status)


def test_runs_that_can_never_be_resumed_as_this_job_are_replaced(tmp_path):
    assert plan_job(tmp_path / "fresh", "aaaa").action == "start"
    write_run(tmp_path / "other", config_hash="bbbb")
    assert plan_job(tmp_path / "other", "aaaa").reason == "holds another config (hash bbbb)"
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "results.json").write_text('{"status": "runn')  # not written by mbn (mbn writes atomically)
    assert plan_job(tmp_path / "garbled", "aaaa").action == "replace"
    write_run(tmp_path / "orphan")
    (tmp_path / "orphan" / "results.json").unlink()
    assert plan_job(tmp_path / "orphan", "aaaa").reason == "checkpoints without a results.json"

    for name in ("garbled", "orphan"):
        assert prepare_output_dir(tmp_path / name, "aaaa") is None
        assert not (tmp_path / name / "checkpoints").exists() and not (tmp_path / name / "results.json").exists()
        assert len(list((tmp_path / name / ".replaced").iterdir())) == 1


def test_a_record_cut_short_beside_a_checkpoint_resumes_from_it(tmp_path):
    write_run(tmp_path / "cut")
    (tmp_path / "cut" / "results.json").write_text('{"status": "compl')
    plan = plan_job(tmp_path / "cut", "aaaa")
    assert (plan.action, plan.reason) == ("resume", "unreadable results.json; its checkpoint resumes the run")


def test_a_run_of_the_same_config_under_another_dir_name_is_the_jobs_run(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "seed=0", status="failed", config_hash="aaaa")
    write_run(sweep / "norm=mbn,seed=0", config_hash="bbbb")
    plan = plan_job(sweep / "norm=bn,seed=0", "aaaa", search=[sweep])
    assert (plan.action, plan.run_dir, plan.reason) == ("resume", sweep / "seed=0", "failed after epoch 2")
    assert plan.line(sweep / "norm=bn,seed=0") == (f"mbn-train: would resume {sweep / 'seed=0'} (failed after epoch 2; "
                                                    f"the same config as {sweep / 'norm=bn,seed=0'})")
    assert plan_job(sweep / "norm=bn,seed=0", "aaaa").run_dir is None  # searched only where asked
    assert plan_job(sweep / "norm=bn,seed=0", "cccc", search=[sweep]).action == "start"
    # A completed run beats a failed one; one running in another process beats both.
    write_run(tmp_path / "runs" / "seed=0", config_hash="aaaa")
    assert find_same_config("aaaa", [sweep, tmp_path / "runs"]) == tmp_path / "runs" / "seed=0"
    with job_lock(sweep / "seed=0"):
        assert find_same_config("aaaa", [sweep, tmp_path / "runs"]) == sweep / "seed=0"
        plan = plan_job(sweep / "norm=bn,seed=0", "aaaa", search=[sweep, tmp_path / "runs"])
        assert (plan.action, plan.running_elsewhere, plan.run_dir) == ("skip", True, sweep / "seed=0")
    # The job's own dir holding its config wins over any other dir.
    write_run(sweep / "norm=bn,seed=0", status="interrupted", config_hash="aaaa")
    assert plan_job(sweep / "norm=bn,seed=0", "aaaa", search=[sweep, tmp_path / "runs"]).run_dir is None


def test_replacing_twice_keeps_both_earlier_runs(tmp_path):
    write_run(tmp_path / "run", status="diverged")
    assert prepare_output_dir(tmp_path / "run", "aaaa", rerun_diverged=True) is None
    write_run(tmp_path / "run", status="diverged")
    assert prepare_output_dir(tmp_path / "run", "aaaa", rerun_diverged=True) is None
    assert sorted(p.name for p in (tmp_path / "run" / ".replaced").iterdir()) == ["aaaa", "aaaa-2"]


def hold_lock(run_dir, ready, release) -> None:
    with job_lock(run_dir):
        ready.set()
        release.wait(30)


def test_the_lock_is_held_across_processes_and_released_when_the_holder_ends(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, status="running")
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock, args=(run_dir, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        assert is_locked(run_dir)
        assert plan_job(run_dir, "aaaa").action == "skip"
        with pytest.raises(JobBusy, match="is being run by another process"):
            with job_lock(run_dir):
                pass
    finally:
        release.set()
        holder.join(30)
    assert not is_locked(run_dir)
    assert plan_job(run_dir, "aaaa").action == "resume"


def save_checkpoint(path, **extra) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, **extra}, path)


def test_verify_checkpoint_resumes_only_this_configs_loadable_checkpoint(tmp_path):
    from mbn.train.run_dir import CHECKPOINT_HASH_KEY, JobPlan, verify_checkpoint

    resume = JobPlan("resume", "failed after epoch 1", "failed", "aaaa")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(ckpt, **{CHECKPOINT_HASH_KEY: "aaaa"})
    assert verify_checkpoint(resume, tmp_path, "aaaa") is resume
    save_checkpoint(ckpt, **{CHECKPOINT_HASH_KEY: "bbbb"})
    plan = verify_checkpoint(resume, tmp_path, "aaaa")
    assert plan.action == "replace" and "from another config (hash bbbb, this run's is aaaa)" in plan.reason
    save_checkpoint(ckpt)  # written before checkpoints carried their config's hash
    assert verify_checkpoint(resume, tmp_path, "aaaa").action == "replace"
    ckpt.write_bytes(b"garbage")
    plan = verify_checkpoint(resume, tmp_path, "aaaa")
    assert plan.action == "refuse" and str(ckpt) in plan.reason and "remove it to restart the run" in plan.reason
    assert plan.line(tmp_path).startswith(f"mbn-train: cannot resume {tmp_path}: ")
    # Plans that load nothing are left as they are.
    skip = JobPlan("skip", "completed", "completed", "aaaa")
    assert verify_checkpoint(skip, tmp_path, "aaaa") is skip


def test_results_json_has_one_writer_and_the_cli_no_hydra_internals_globals_or_argv_swaps():
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "mbn"
    writers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "write_results(" in p.read_text()
                     and p.name != "results.py")
    assert writers == ["train/run_dir.py"]
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "import hydra._internal" not in text and "from hydra._internal" not in text, path
        # Only the console script, the program that owns the command line, may set sys.argv (for the
        # command's run: hydra.main reads nothing else, facebookresearch/hydra#2064).
        assert "sys.argv =" not in text or path.relative_to(package).as_posix() == "cli/entry_points.py", path
