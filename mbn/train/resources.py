"""Share one machine between parallel jobs: each job gets its GPU(s) and its share of CPU threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class JobResources:
    """What one of several parallel jobs may use.

    Args:
        num_threads: ``torch.set_num_threads`` value.
        cuda_visible_devices: value for ``CUDA_VISIBLE_DEVICES`` (None = leave it as it is).
    """

    num_threads: int
    cuda_visible_devices: str | None


def job_resources(
    slot: int, n_jobs: int, cpu_count: int, gpu_ids: Sequence[str] = (), devices_per_job: int = 1
) -> JobResources:
    """Pin parallel job ``slot`` (of ``n_jobs`` running at once) to its GPUs and CPU threads.

    Threads: ``cpu_count // n_jobs`` (at least 1), split again between the job's processes when
    it runs several (DDP on CPU). GPUs: job ``slot`` gets ``devices_per_job`` consecutive GPUs
    starting at ``slot * devices_per_job``, wrapping around, so more jobs than GPUs share them
    evenly (several small-batch jobs per GPU); with one GPU or none nothing is changed.

    Args:
        slot: the job's slot in ``[0, n_jobs)`` (its job number modulo ``n_jobs``).
        n_jobs: jobs running at the same time.
        cpu_count: CPU cores available to all the jobs.
        gpu_ids: the GPU ids the jobs share (e.g. from ``CUDA_VISIBLE_DEVICES``).
        devices_per_job: GPUs (or CPU processes) one job uses.

    Raises:
        ValueError: a count is not positive or ``slot`` is outside ``[0, n_jobs)``.
    """
    for name, value in (("n_jobs", n_jobs), ("cpu_count", cpu_count), ("devices_per_job", devices_per_job)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if not 0 <= slot < n_jobs:
        raise ValueError(f"slot must be in [0, {n_jobs}), got {slot}")
    num_threads = max(1, cpu_count // n_jobs)
    gpu_ids = [str(g) for g in gpu_ids]
    if len(gpu_ids) <= 1:
        return JobResources(max(1, num_threads // devices_per_job), None)
    if devices_per_job > len(gpu_ids):
        raise ValueError(f"devices_per_job={devices_per_job} exceeds the {len(gpu_ids)} GPUs {','.join(gpu_ids)}")
    start = slot * devices_per_job
    chosen = [gpu_ids[(start + i) % len(gpu_ids)] for i in range(devices_per_job)]
    return JobResources(max(1, num_threads // devices_per_job), ",".join(chosen))


def visible_gpu_ids() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
