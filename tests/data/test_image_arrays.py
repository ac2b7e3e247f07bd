"""ImageArrays / DatasetSplits containers: validation, stratified subsets, channel statistics."""

from __future__ import annotations

import pytest
import torch

from mbn.data import DatasetSplits, ImageArrays, channel_stats, stratified_holdout


def arrays_with_counts(counts: list[int], size: int = 4) -> ImageArrays:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    # pixel (0, 0, 0) stores the sample's original index so subsets can be traced back
    images = torch.zeros(len(labels), 3, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels)) % 256
    images[:, 1, 0, 0] = torch.arange(len(labels)) // 256
    return ImageArrays(images, labels.long(), [f"c{i}" for i in range(len(counts))])


def original_index(arrays: ImageArrays) -> torch.Tensor:
    return arrays.images[:, 0, 0, 0].long() + 256 * arrays.images[:, 1, 0, 0].long()


def test_subset_is_stratified_deterministic_and_keeps_order():
    data = arrays_with_counts([100] * 10)
    subset = data.subset(55, seed=3)
    assert len(subset) == 55
    counts = torch.bincount(subset.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    index = original_index(subset)
    assert torch.equal(index, torch.sort(index).values)
    assert torch.equal(subset.labels, data.labels[index])
    assert torch.equal(original_index(data.subset(55, seed=3)), index)
    assert not torch.equal(original_index(data.subset(55, seed=4)), index)
    assert subset.classes == data.classes


def test_subset_of_imbalanced_classes_is_proportional():
    subset = arrays_with_counts([600, 300, 100]).subset(100, seed=0)
    assert torch.bincount(subset.labels).tolist() == [60, 30, 10]


def test_subset_of_everything_is_a_permutation_free_copy():
    data = arrays_with_counts([5, 7])
    full = data.subset(len(data), seed=0)
    assert torch.equal(full.images, data.images) and torch.equal(full.labels, data.labels)


@pytest.mark.parametrize("n", [0, 13])
def test_subset_size_out_of_range_is_an_error(n):
    with pytest.raises(ValueError, match=rf"subset size n must be in \[1, 12\], got {n}"):
        arrays_with_counts([6, 6]).subset(n, seed=0)


def test_holdout_is_stratified_disjoint_from_the_rest_and_fixed_by_its_seed():
    data = arrays_with_counts([600, 300, 100])
    held, rest = stratified_holdout(data.labels, 3, 100, seed=5)
    assert torch.bincount(data.labels[held], minlength=3).tolist() == [60, 30, 10]
    assert len(held) == 100 and len(rest) == 900
    assert set(held.tolist()).isdisjoint(rest.tolist()) and set(held.tolist()) | set(rest.tolist()) == set(range(1000))
    assert torch.equal(held, torch.sort(held).values) and torch.equal(rest, torch.sort(rest).values)
    assert torch.equal(stratified_holdout(data.labels, 3, 100, seed=5)[0], held)
    assert not torch.equal(stratified_holdout(data.labels, 3, 100, seed=6)[0], held)


@pytest.mark.parametrize("n", [0, 12])
def test_holdout_must_leave_samples_in_the_rest(n):
    with pytest.raises(ValueError, match=rf"held-out size must be in \[1, 11\] \(fewer than the 12 samples\), got {n}"):
        stratified_holdout(arrays_with_counts([6, 6]).labels, 2, n, seed=0)


def test_image_arrays_validates_dtype_and_shapes():
    with pytest.raises(ValueError, match="uint8 N x C x H x W"):
        ImageArrays(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="labels must be an int64 tensor of shape \\(2,\\)"):
        ImageArrays(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"])
    non_contiguous = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    assert ImageArrays(non_contiguous, torch.zeros(2, dtype=torch.long), ["a"]).images.is_contiguous()


def test_channel_stats_match_a_direct_float_computation():
    images = torch.randint(0, 256, (37, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images, chunk=8)
    pixels = images.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), pixels.mean(1), atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), pixels.std(1, unbiased=False), atol=1e-12)


def test_dataset_splits_properties_and_consistency_checks():
    train, test = arrays_with_counts([4, 4]), arrays_with_counts([2, 2])
    splits = DatasetSplits("toy", train, test, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert splits.num_classes == 2
    assert splits.image_shape == (3, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        DatasetSplits("toy", train, arrays_with_counts([2, 2], size=5), mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(ValueError, match="same class list"):
        DatasetSplits("toy", train, arrays_with_counts([2, 2, 2]), mean=(0.5,) * 3, std=(0.2,) * 3)
