"""The fake dataset and load_dataset's dispatch and argument checking."""

from __future__ import annotations

import pytest
import torch

from mbn.data import DATASET_KINDS, dataset_arguments, load_dataset


def test_fake_data_is_deterministic_with_requested_shapes():
    kwargs = dict(num_train=60, num_test=20, num_classes=4, image_size=12, channels=1, seed=5)
    data = load_dataset("fake", **kwargs)
    assert (len(data.train), len(data.test), data.image_shape, data.num_classes) == (60, 20, (1, 12, 12), 4)
    assert torch.bincount(data.train.labels).tolist() == [15] * 4
    again = load_dataset("fake", **kwargs)
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
    other = load_dataset("fake", **dict(kwargs, seed=6))
    assert not torch.equal(other.train.images, data.train.images)
    assert len(data.mean) == len(data.std) == 1


def test_fake_data_is_learnable_by_a_nearest_class_mean_classifier():
    data = load_dataset("fake", num_train=500, num_test=200, num_classes=10, seed=0)
    features = lambda arrays: arrays.images.float().flatten(1)  # noqa: E731
    centroids = torch.stack([features(data.train)[data.train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(features(data.test), centroids).argmin(1)
    accuracy = (predicted == data.test.labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_kinds_and_their_arguments():
    assert DATASET_KINDS == ("cifar10_archive", "cifar10", "cifar100", "imagefolder", "imagenet", "fake")
    assert dataset_arguments("cifar10_archive") == ("archive", "cache_dir")
    assert dataset_arguments("cifar100") == ("root", "download", "cache_dir")
    assert dataset_arguments("imagefolder") == ("root", "image_size", "cache_dir", "train_dir", "val_dir")
    assert dataset_arguments("imagenet") == dataset_arguments("imagefolder")
    assert dataset_arguments("fake") == ("num_train", "num_test", "num_classes", "image_size", "channels", "seed")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="unknown dataset kind 'cifar11'; expected one of cifar10_archive, cifar10"):
        load_dataset("cifar11")


def test_unknown_or_missing_arguments_are_named():
    with pytest.raises(ValueError, match="dataset kind 'fake': unknown argument\\(s\\) batch_size, sizes; accepted"):
        load_dataset("fake", sizes=3, batch_size=2)
    with pytest.raises(ValueError, match="dataset kind 'cifar10_archive': missing a required argument: 'archive'"):
        load_dataset("cifar10_archive")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_train=0), "num_train must be a positive integer, got 0"),
    (dict(num_classes=1), "num_classes must be at least 2"),
    (dict(image_size=2.5), "image_size must be a positive integer"),
    (dict(seed=None), "seed must be an integer"),
])
def test_fake_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("fake", **kwargs)
