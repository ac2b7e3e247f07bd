"""StackedBatchLoader: every member sees exactly its single run's batches; eval repeats; epochs; refusals."""

from __future__ import annotations

import pytest
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch

from mbn.data import ImageArrays, StackedBatchLoader, TensorBatchLoader

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def arrays(n: int = 40, size: int = 6) -> ImageArrays:
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageArrays(images, torch.arange(n), [str(i) for i in range(n)])


def loader(data: ImageArrays, seed: int, batch_size: int = 4, **kwargs) -> TensorBatchLoader:
    options = dict(mean=MEAN, std=STD, shuffle=True, drop_last=True, augment=True, seed=seed, crop_padding=2)
    options.update(kwargs)
    return TensorBatchLoader(data, batch_size, **options)


def single_batches(single: TensorBatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    single.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in single]


def test_member_k_sees_exactly_the_batches_of_its_single_run_in_every_epoch():
    data = arrays()
    stacked = StackedBatchLoader([loader(data, seed) for seed in (0, 1, 2)])
    assert len(stacked) == 10 and stacked.num_members == 3
    for epoch in (0, 3):
        _set_sampler_epoch(stacked, epoch)  # as Lightning calls it at each epoch start
        batches = list(stacked)
        assert len(batches) == 10
        for k, seed in enumerate((0, 1, 2)):
            expected = single_batches(loader(data, seed), epoch)
            for (x, y), (x_single, y_single) in zip(batches, expected):
                assert x.shape == (4, 9, 6, 6) and y.shape == (4, 3)
                assert torch.equal(x[:, 3 * k : 3 * k + 3], x_single)
                assert torch.equal(y[:, k], y_single)
    first = list(stacked)[0][1]
    assert not torch.equal(first[:, 0], first[:, 1])  # the seeds really shuffle differently


def test_one_loader_for_all_members_is_read_once_and_repeated_for_evaluation():
    data = arrays(10)
    val = loader(data, 0, batch_size=4, shuffle=False, drop_last=False, augment=False)
    plans = []  # every iteration of the loader draws its epoch plan once
    draw_plan = val.epoch_plan
    val.epoch_plan = lambda epoch: plans.append(epoch) or draw_plan(epoch)
    batches = list(StackedBatchLoader([val] * 3))
    assert plans == [0]
    assert [y.shape for _, y in batches] == [(4, 3), (4, 3), (2, 3)]
    expected = list(val)
    for (x, y), (x_single, y_single) in zip(batches, expected):
        assert torch.equal(x, x_single.repeat(1, 3, 1, 1))
        assert torch.equal(y, y_single[:, None].expand(-1, 3))


def test_loaders_that_cannot_be_stacked_are_refused():
    data = arrays()
    with pytest.raises(ValueError, match="at least one loader"):
        StackedBatchLoader([])
    with pytest.raises(ValueError, match="loader 1 yields 5 batches of 8, loader 0 10 of 4"):
        StackedBatchLoader([loader(data, 0), loader(data, 1, batch_size=8)])
    uneven = StackedBatchLoader([loader(arrays(10), 0, drop_last=False), loader(arrays(11), 1, drop_last=False)])
    with pytest.raises(ValueError, match=r"different sizes \[2, 3\]"):
        list(uneven)
