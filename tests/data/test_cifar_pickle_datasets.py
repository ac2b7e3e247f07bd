"""cifar10 / cifar100 kinds on generated stand-ins written in torchvision's pickle layout."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets
from data_layouts import write_cifar_pickles

from mbn.data import load_dataset


def make_split(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), [int(v) for v in rng.integers(0, num_classes, n)]


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickles_are_read_pixel_exact_with_labels_and_class_names(tmp_path, rng, name, num_classes):
    train, test = make_split(rng, 23, num_classes), make_split(rng, 7, num_classes)
    class_names = [f"name{i:03d}" for i in range(num_classes)]
    write_cifar_pickles(tmp_path / "root", name, train, test, class_names)
    data = load_dataset(name, root=str(tmp_path / "root"), cache_dir=tmp_path / "cache")
    assert data.name == name and data.num_classes == num_classes and data.train.classes == class_names
    assert data.image_shape == (3, 32, 32)
    # rows are R plane, G plane, B plane: the same as C x H x W
    assert torch.equal(data.train.images, torch.from_numpy(train[0]))
    assert data.train.labels.tolist() == train[1]
    assert torch.equal(data.test.images, torch.from_numpy(test[0]))
    assert data.test.labels.tolist() == test[1]
    assert len(list((tmp_path / "cache").glob(f"{name}-*.pt"))) == 1
    cached = load_dataset(name, root=tmp_path / "root", cache_dir=tmp_path / "cache")
    assert torch.equal(cached.train.images, data.train.images) and cached.std == data.std


def test_cifar100_uses_fine_labels(tmp_path, rng):
    train, test = make_split(rng, 10, 100), make_split(rng, 4, 100)
    write_cifar_pickles(tmp_path, "cifar100", train, test, [str(i) for i in range(100)])
    data = load_dataset("cifar100", root=tmp_path, cache_dir=tmp_path / "cache")
    assert data.train.labels.tolist() == train[1]  # coarse labels are label // 5, so a mix-up would show


def test_missing_cifar_without_download_names_the_expected_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no folder {tmp_path / 'cifar-100-python'}.*download=true"):
        load_dataset("cifar100", root=tmp_path, download=False, cache_dir=tmp_path)


def test_missing_batch_file_is_named(tmp_path, rng):
    train, test = make_split(rng, 10, 10), make_split(rng, 2, 10)
    folder = write_cifar_pickles(tmp_path, "cifar10", train, test, list("abcdefghij"))
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing CIFAR file .*data_batch_3"):
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")


def test_download_is_skipped_when_the_folder_exists(tmp_path, rng, monkeypatch):
    write_cifar_pickles(tmp_path, "cifar10", make_split(rng, 10, 10), make_split(rng, 2, 10), list("abcdefghij"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("must not download"))
    assert len(load_dataset("cifar10", root=tmp_path, download=True, cache_dir=tmp_path / "cache").train) == 10


def test_failed_download_explains_the_offline_alternatives(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(RuntimeError, match=f"could not download cifar100 into {tmp_path} .*cifar-100-python/ there"):
        load_dataset("cifar100", root=tmp_path, download=True, cache_dir=tmp_path)


def test_cache_dir_defaults_to_mbn_cache_dir(tmp_path, rng, monkeypatch):
    write_cifar_pickles(tmp_path / "root", "cifar10", make_split(rng, 10, 10), make_split(rng, 2, 10), list("abcdefghij"))
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "env-cache"))
    load_dataset("cifar10", root=tmp_path / "root")
    assert len(list((tmp_path / "env-cache").glob("cifar10-*.pt"))) == 1
