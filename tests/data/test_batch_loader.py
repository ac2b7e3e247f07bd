"""TensorBatchLoader: normalization, augmentation correctness, determinism, sharding, batch sizes, errors."""

from __future__ import annotations

import pytest
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch

from mbn.data import ImageArrays, TensorBatchLoader, load_dataset

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def numbered_arrays(n: int = 50, size: int = 8) -> ImageArrays:
    """Random images labelled with their own index, so every batch can be traced back to its samples."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageArrays(images, torch.arange(n), [str(i) for i in range(n)])


def make_loader(arrays: ImageArrays, batch_size: int = 4, **kwargs) -> TensorBatchLoader:
    options = dict(mean=MEAN, std=STD, shuffle=True, drop_last=True, augment=True, seed=0)
    options.update(kwargs)
    return TensorBatchLoader(arrays, batch_size, **options)


def epoch_batches(loader: TensorBatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1)
    return (pixels.float() / 255 - mean) / std


def test_without_augmentation_batches_are_the_normalized_images_in_order():
    data = numbered_arrays(10)
    loader = make_loader(data, 4, shuffle=False, drop_last=False, augment=False)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2] and len(loader) == 3
    x = torch.cat([x for x, _ in batches])
    assert x.dtype == torch.float32 and batches[0][1].dtype == torch.int64
    assert torch.allclose(x, normalize(data.images), atol=1e-6)
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels)


def test_augmented_sample_is_the_padded_crop_then_optional_flip_of_its_image():
    data = numbered_arrays(40, size=6)
    loader = make_loader(data, 5, crop_padding=2, chunk_size=10)
    loader.set_epoch(3)
    indices, dy, dx, flip = loader.epoch_plan(3)
    assert flip.any() and (~flip).any() and len(set(dy.tolist())) > 1 and len(set(dx.tolist())) > 1
    x = torch.cat([x for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    assert torch.equal(y, indices)  # labels are the sample indices
    for k, i in enumerate(indices.tolist()):
        padded = torch.nn.functional.pad(data.images[i], (2, 2, 2, 2))  # zero padding
        crop = padded[:, dy[k] : dy[k] + 6, dx[k] : dx[k] + 6]
        expected = normalize(crop.flip(2) if flip[k] else crop)
        assert torch.allclose(x[k], expected, atol=1e-6), k


def test_crop_of_a_known_image_is_the_expected_slice():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4)
    data = ImageArrays(image, torch.zeros(1, dtype=torch.int64), ["only"])
    loader = TensorBatchLoader(
        data, 1, mean=(0, 0, 0), std=(1 / 255,) * 3, shuffle=False, drop_last=True, augment=True, crop_padding=1
    )
    seen = set()
    for epoch in range(40):
        _, dy, dx, flip = loader.epoch_plan(epoch)
        loader.set_epoch(epoch)
        (x, _), = list(loader)
        # with mean 0 and std 1/255 the output is the raw pixel value
        padded = torch.zeros(3, 6, 6)
        padded[:, 1:5, 1:5] = image[0].float()
        expected = padded[:, dy[0] : dy[0] + 4, dx[0] : dx[0] + 4]
        expected = expected.flip(2) if flip[0] else expected
        assert torch.equal(x[0], expected)
        seen.add((int(dy[0]), int(dx[0]), bool(flip[0])))
    assert len(seen) > 5  # offsets and flips actually vary


def test_same_seed_and_epoch_reproduce_batches_and_other_epochs_or_seeds_differ():
    data = numbered_arrays()
    first = epoch_batches(make_loader(data), 1)
    again = epoch_batches(make_loader(data), 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other_epoch = epoch_batches(make_loader(data), 2)
    other_seed = epoch_batches(make_loader(data, seed=1), 1)
    for other in (other_epoch, other_seed):
        assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))


def test_resuming_at_an_epoch_boundary_reproduces_the_uninterrupted_run():
    data = numbered_arrays()
    uninterrupted = make_loader(data)
    for epoch in range(3):
        batches = epoch_batches(uninterrupted, epoch)
    resumed = epoch_batches(make_loader(data), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, resumed))


def test_iterating_twice_without_set_epoch_repeats_the_epoch():
    loader = make_loader(numbered_arrays())
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.cat([x for x, _ in loader]))


def test_lightning_sets_the_epoch_through_the_sampler_attribute():
    loader = make_loader(numbered_arrays())
    _set_sampler_epoch(loader, 7)
    assert loader.epoch == 7


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_equal_shares(drop_last):
    data = numbered_arrays(50)
    loaders = [make_loader(data, 4, drop_last=drop_last, rank=r, world_size=3) for r in range(3)]
    per_rank = [torch.cat([y for _, y in epoch_batches(loader, 5)]) for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    if drop_last:
        # 16 samples per rank -> 4 full batches each; disjoint
        assert [len(y) for y in per_rank] == [16, 16, 16]
        assert len(set(torch.cat(per_rank).tolist())) == 48
    else:
        # 17 per rank (51 slots, one sample repeated); every sample appears
        assert [len(y) for y in per_rank] == [17, 17, 17]
        assert set(torch.cat(per_rank).tolist()) == set(range(50))


def test_union_over_ranks_is_the_single_process_epoch():
    data = numbered_arrays(48)
    single = torch.cat([y for _, y in epoch_batches(make_loader(data, 4), 2)])
    shards = [torch.cat([y for _, y in epoch_batches(make_loader(data, 2, rank=r, world_size=2), 2)]) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(single.tolist()) == list(range(48))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 16])
def test_drop_last_gives_full_batches_and_drops_only_the_remainder(batch_size):
    data = numbered_arrays(50)
    loader = make_loader(data, batch_size, chunk_size=8)
    sizes = [len(y) for _, y in loader]
    assert sizes == [batch_size] * (50 // batch_size) == [batch_size] * len(loader)
    assert len(set(torch.cat([y for _, y in loader]).tolist())) == 50 // batch_size * batch_size


def test_without_drop_last_every_sample_appears_once():
    loader = make_loader(numbered_arrays(50), 16, drop_last=False)
    ys = [y for _, y in loader]
    assert [len(y) for y in ys] == [16, 16, 16, 2] and len(loader) == 4
    assert sorted(torch.cat(ys).tolist()) == list(range(50))


def test_shuffle_false_with_augmentation_keeps_dataset_order():
    loader = make_loader(numbered_arrays(20), 5, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(20))


def test_augmented_real_sized_batches_keep_pixel_statistics_close_to_normalized():
    data = load_dataset("fake", num_train=256, num_test=8)
    loader = TensorBatchLoader(data.train, 64, mean=data.mean, std=data.std, shuffle=True, drop_last=True,
                               augment=False)
    x = torch.cat([x for x, _ in loader])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=51), "batch_size=51 is larger than the 50 samples per rank"),
        (dict(batch_size=20, world_size=3), "batch_size=20 is larger than the 16 samples per rank"),
        (dict(rank=2, world_size=2), r"rank must be an integer in \[0, world_size=2\), got 2"),
        (dict(mean=(0.5,)), "mean and std need 3 values"),
        (dict(std=(0.2, 0.0, 0.3)), "std values must be positive"),
        (dict(crop_padding=-1), "crop_padding must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_named_in_the_error(kwargs, message):
    batch_size = kwargs.pop("batch_size", 4)
    with pytest.raises(ValueError, match=message):
        make_loader(numbered_arrays(50), batch_size, **kwargs)


def test_batch_larger_than_data_is_fine_without_drop_last():
    loader = make_loader(numbered_arrays(5), 8, drop_last=False)
    assert [len(y) for _, y in loader] == [5]


def test_negative_epoch_is_rejected():
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        make_loader(numbered_arrays()).set_epoch(-1)
