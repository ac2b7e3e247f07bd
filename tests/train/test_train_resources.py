"""Pinning parallel jobs to GPUs and CPU threads (a pure function of slot, job count and hardware)."""

from __future__ import annotations

import pytest

from mbn.train.resources import JobResources, job_resources


@pytest.mark.parametrize(
    "slot, n_jobs, cores, gpus, per_job, expected",
    [
        (0, 2, 2, [], 1, JobResources(1, None)),  # this machine: 2 cores, no GPU
        (1, 2, 8, [], 1, JobResources(4, None)),
        (0, 1, 8, [], 1, JobResources(8, None)),
        (2, 3, 2, [], 1, JobResources(1, None)),  # more jobs than cores: still one thread each
        (0, 4, 16, ["0"], 1, JobResources(4, None)),  # one GPU: all jobs share it, nothing to pin
        (0, 2, 16, ["0", "1"], 1, JobResources(8, "0")),
        (1, 2, 16, ["0", "1"], 1, JobResources(8, "1")),
        (2, 4, 16, ["0", "1"], 1, JobResources(4, "0")),  # 4 jobs on 2 GPUs: 2 per GPU
        (3, 4, 16, ["0", "1"], 1, JobResources(4, "1")),
        (1, 3, 24, ["4", "5", "6"], 1, JobResources(8, "5")),  # ids from CUDA_VISIBLE_DEVICES are kept
        (1, 2, 16, ["0", "1", "2", "3"], 2, JobResources(4, "2,3")),  # 2-GPU DDP jobs
        (1, 3, 16, ["0", "1", "2"], 2, JobResources(2, "2,0")),  # wraps around
        (0, 1, 2, [], 2, JobResources(1, None)),  # CPU DDP job of 2 processes on 2 cores
    ],
)
def test_job_resources(slot, n_jobs, cores, gpus, per_job, expected):
    assert job_resources(slot, n_jobs, cores, gpus, per_job) == expected


def test_every_gpu_gets_the_same_number_of_jobs():
    gpus = [str(i) for i in range(4)]
    assigned = [job_resources(slot, 8, 32, gpus).cuda_visible_devices for slot in range(8)]
    assert sorted(assigned) == sorted(gpus * 2)


@pytest.mark.parametrize(
    "args, message",
    [
        ((2, 2, 2), "slot must be in [0, 2), got 2"),
        ((0, 0, 2), "n_jobs must be a positive integer, got 0"),
        ((0, 1, 0), "cpu_count must be a positive integer, got 0"),
        ((0, 1, 2, ["0", "1"], 3), "devices_per_job=3 exceeds the 2 GPUs 0,1"),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        job_resources(*args)
