"""``hydra/launcher=slurm`` composes for a cluster; its local twin runs a sweep through submitit here."""

from __future__ import annotations

import os

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sweep_helpers import sweep_runs

from cli_runner import mbn_train as main

from mbn.cli.config import CONFIG_DIR


def launcher_config(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_launcher_config_composes_with_one_task_per_gpu():
    launcher = launcher_config(["experiment=paper_cifar10", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] > 0 and launcher["array_parallelism"] > 0
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1
    assert launcher["max_num_timeout"] > 0  # timed-out jobs are requeued and resume from last.ckpt
    assert launcher["name"] == "mbn-paper_cifar10"

    ddp = launcher_config(["experiment=paper_cifar10", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert (ddp["gpus_per_node"], ddp["tasks_per_node"], ddp["nodes"]) == (4, 4, 2)


def test_submitit_local_runs_a_two_job_sweep_end_to_end(tiny, run_env, capsys):
    argv = ["-m", *tiny(), "seed=0,1", "sweep_name=slurm", "hydra/launcher=slurm_local"]
    assert main(argv) == 0
    assert "mbn-train: sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in capsys.readouterr().out
    runs = sweep_runs(run_env / "sweeps" / "slurm")
    assert sorted(r["seed"] for r in runs.values()) == [0, 1]
    assert all(r["status"] == "completed" for r in runs.values())
    assert os.getpid() not in {r["attempts"][0]["pid"] for r in runs.values()}  # submitit's job processes
    assert (run_env / "sweeps" / "slurm" / ".submitit").is_dir()


def test_a_stacked_pack_is_one_submitit_job(tiny, run_env, capsys):
    argv = ["-m", *tiny(), "seed=0,1,2", "stack=3", "sweep_name=slurmstack", "hydra/launcher=slurm_local"]
    assert main(argv) == 0
    assert "mbn-train: sweep done: 3 completed, 0 failed, 0 skipped (of 3 jobs)" in capsys.readouterr().out
    runs = sweep_runs(run_env / "sweeps" / "slurmstack")
    assert sorted(r["seed"] for r in runs.values()) == [0, 1, 2]
    pids = {r["attempts"][0]["pid"] for r in runs.values()}
    assert len(pids) == 1 and os.getpid() not in pids  # the whole pack in one submitit job process
