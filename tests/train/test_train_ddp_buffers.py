"""trainer.mbn_history under DDP on 2 CPU processes (gloo): per_device keeps each rank's M/Phi its own
batches' history; rank0 copies rank 0's to every rank at each forward; the running statistics are
rank 0's either way (DDP's broadcast).

Error model (tests/numerics.py): a rank and the one-process replay compute the same float32
statistics (a mean and a variance of 16 values per channel, an average with the previous ones) in
possibly another order (another thread count): per tensor, norm-wise, within 16 * steps * eps(float32).
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbn.nn import MomentumBatchNorm2d
from mbn.train.ddp_buffers import keep_momentum_stats_per_device, momentum_buffer_names
from numerics import assert_close_normwise

pytestmark = pytest.mark.numerics

STEPS = 3
STATE = ("momentum_mean", "momentum_var", "running_mean", "running_var")


def batch(rank: int, step: int) -> torch.Tensor:
    """Each rank's data has its own mean and spread, so per-rank statistics differ clearly."""
    generator = torch.Generator().manual_seed(100 * rank + step)
    return 10.0 * rank + (1 + rank) * torch.randn(4, 3, 2, 2, generator=generator)


def new_layer() -> MomentumBatchNorm2d:
    return MomentumBatchNorm2d(3, schedule="fixed", fixed_lam=0.6, tau0=0.5, ideal_batch_size=4)


def train_rank(rank: int, init_file: str, history: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = nn.Sequential(new_layer())
    if history == "per_device":
        keep_momentum_stats_per_device(model)
    wrapped = DistributedDataParallel(model)  # broadcast_buffers=True, DDP's default
    for step in range(STEPS):
        wrapped(batch(rank, step)).sum().backward()
    # Plain lists: a tensor would travel as a shared-memory fd that dies with this process (a race
    # with the parent's read).
    results.put((rank, {name: getattr(model[0], name).tolist() for name in STATE}))
    dist.destroy_process_group()


def replay(steps: list[tuple[int, int]], start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One process's layer fed batch(rank, step) for each pair, from ``start``'s buffers."""
    layer = new_layer()
    if start is not None:
        layer.load_state_dict(start)
    for rank, step in steps:
        layer(batch(rank, step))
    return layer.state_dict()


def run_two_ranks(history: str, tmp_path) -> dict[int, dict[str, torch.Tensor]]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=train_rank, args=(rank, str(tmp_path / "init"), history, results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    states = {rank: {name: torch.tensor(value) for name, value in state.items()}
              for rank, state in (results.get(timeout=120) for _ in workers)}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return states


def assert_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], names) -> None:
    for name in names:
        assert_close_normwise(actual[name], expected[name], dtype=torch.float32, steps=STEPS, growth=16, what=name)


def test_per_device_history_is_each_ranks_own_and_running_statistics_are_rank_0s(tmp_path):
    states = run_two_ranks("per_device", tmp_path)
    for rank in (0, 1):
        # M/Phi: the rank's own batches only, exactly as one process would have them.
        assert_state(states[rank], replay([(rank, s) for s in range(STEPS)]), ("momentum_mean", "momentum_var"))
    # Running statistics: rank 1 starts each step from rank 0's (broadcast), then adds its own batch.
    rank0_before_last = replay([(0, s) for s in range(STEPS - 1)])
    assert_state(states[1], replay([(1, STEPS - 1)], start=rank0_before_last), ("running_mean", "running_var"))
    assert not torch.allclose(states[0]["momentum_mean"], states[1]["momentum_mean"])


def test_rank0_history_copies_rank_0s_momentum_statistics_at_every_forward(tmp_path):
    states = run_two_ranks("rank0", tmp_path)
    assert_state(states[0], replay([(0, s) for s in range(STEPS)]), STATE)
    rank0_before_last = replay([(0, s) for s in range(STEPS - 1)])
    assert_state(states[1], replay([(1, STEPS - 1)], start=rank0_before_last), STATE)


def test_the_ignored_names_are_the_mbn_layers_momentum_buffers_only():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), new_layer(), nn.BatchNorm2d(3))
    names = keep_momentum_stats_per_device(model)
    assert names == momentum_buffer_names(model) == ["1.momentum_mean", "1.momentum_var", "1.momentum_initialized"]
    assert model._ddp_params_and_buffers_to_ignore == names
    assert keep_momentum_stats_per_device(model) == names and model._ddp_params_and_buffers_to_ignore == names


def test_mbn_history_is_checked_where_it_is_defined():
    from mbn.train.spec import SpecError, TrainerSpec

    assert TrainerSpec().mbn_history == "per_device"
    with pytest.raises(SpecError, match="mbn_history: unknown value 'mine'; expected one of per_device, rank0"):
        TrainerSpec(mbn_history="mine")
