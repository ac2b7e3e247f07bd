"""imagefolder and cifar10_archive datasets on generated trees, tarballs and the real CIFAR-10 archive."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from data_layouts import (
    REAL_CIFAR10_ARCHIVE,
    SESSION_CACHE_DIR,
    flat_images,
    make_tree,
    random_images,
    write_dir,
    write_tar,
)

import mbn.data.datasets
from mbn.data import channel_stats, load_dataset

CLASSES = ["zebra", "ant", "moth"]  # not in sorted order on purpose: labels follow sorted names


@pytest.fixture
def tree(rng):
    """Lossless (PNG) 10x12 images: 4/3/2 per class in train/, 2 per class in val/."""
    splits = {
        "train": {cls: random_images(rng, n, (10, 12)) for cls, n in zip(CLASSES, (4, 3, 2))},
        "val": {cls: random_images(rng, 2, (10, 12)) for cls in CLASSES},
    }
    return splits, make_tree(splits)


def expected_arrays(split: dict[str, list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(split)
    images = [image for cls in classes for image in split[cls]]
    labels = [i for i, cls in enumerate(classes) for _ in split[cls]]
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()), torch.tensor(labels)


@pytest.mark.parametrize("layout", ["dir", "tar", "tar.gz with top folder", "shuffled tar.gz"])
def test_imagefolder_decodes_every_layout_exactly(tmp_path, tree, layout):
    splits, files = tree
    if layout == "dir":
        root = write_dir(tmp_path / "toy", files)
    elif layout == "tar":
        root = write_tar(tmp_path / "toy.tar", files)
    elif layout == "tar.gz with top folder":
        root = write_tar(tmp_path / "toy.tar.gz", files, prefix="mini/")
    else:
        order = list(files)
        np.random.default_rng(1).shuffle(order)
        root = write_tar(tmp_path / "toy.tar.gz", files, order=order)
    data = load_dataset("imagefolder", root=str(root), cache_dir=tmp_path / "cache")
    assert data.name == "toy"
    assert data.train.classes == sorted(CLASSES) and data.num_classes == 3
    assert data.image_shape == (3, 12, 10)
    for arrays, split in ((data.train, "train"), (data.test, "val")):
        images, labels = expected_arrays(splits[split])
        assert torch.equal(arrays.images, images)
        assert torch.equal(arrays.labels, labels)
    mean, std = channel_stats(data.train.images)
    assert data.mean == pytest.approx(mean) and data.std == pytest.approx(std)


def test_imagefolder_resizes_mixed_sizes_and_reads_jpeg_and_custom_split_names(tmp_path, rng):
    splits = {
        "training": {"a": random_images(rng, 2, (20, 16)), "b": random_images(rng, 2, (9, 9))},
        "validation": {"a": random_images(rng, 1, (30, 30)), "b": random_images(rng, 1, (8, 8))},
    }
    root = write_tar(tmp_path / "mixed.tar.gz", make_tree(splits, fmt="JPEG", suffix=".JPEG"))
    data = load_dataset("imagefolder", root=root, image_size=6, cache_dir=tmp_path, train_dir="training",
                        val_dir="validation")
    assert data.image_shape == (3, 6, 6)
    assert (len(data.train), len(data.test)) == (4, 2)
    assert data.train.labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_cache_is_reused_and_invalidated_by_source_or_options(tmp_path, tree, monkeypatch):
    _, files = tree
    root = write_tar(tmp_path / "toy.tar", files)
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root=root, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1

    calls = []
    real_decode = mbn.data.datasets.decode_image_tree
    monkeypatch.setattr(mbn.data.datasets, "decode_image_tree", lambda *a: calls.append(a) or real_decode(*a))
    cached = load_dataset("imagefolder", root=root, cache_dir=cache)
    assert calls == []
    assert torch.equal(cached.train.images, first.train.images) and cached.mean == first.mean

    load_dataset("imagefolder", root=root, image_size=5, cache_dir=cache)
    assert len(calls) == 1
    os.utime(root, ns=(1, 1))  # a modified source is decoded again
    load_dataset("imagefolder", root=root, cache_dir=cache)
    assert len(calls) == 2
    assert len(list(cache.glob("*.pt"))) == 3


def test_unreadable_cache_file_is_rebuilt(tmp_path, tree):
    _, files = tree
    root = write_tar(tmp_path / "toy.tar", files)
    first = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(b"not a torch file")
    again = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train.images, first.train.images)


def test_concurrent_loads_decode_once(tmp_path, tree, monkeypatch):
    _, files = tree
    root = write_tar(tmp_path / "toy.tar", files)
    calls = []
    real_decode = mbn.data.datasets.decode_image_tree
    monkeypatch.setattr(mbn.data.datasets, "decode_image_tree", lambda *a: calls.append(a) or real_decode(*a))
    results = []
    load = lambda: results.append(load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c"))  # noqa: E731
    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(calls) == 1
    assert all(torch.equal(r.train.images, results[0].train.images) for r in results)


def test_imagefolder_errors_name_the_problem(tmp_path, tree, rng):
    _, files = tree
    with pytest.raises(FileNotFoundError, match="dataset source not found: .*missing"):
        load_dataset("imagefolder", root=tmp_path / "missing", cache_dir=tmp_path)
    no_val = write_dir(tmp_path / "noval", {k: v for k, v in files.items() if k.startswith("train/")})
    with pytest.raises(FileNotFoundError, match="missing split folder .*noval/val"):
        load_dataset("imagefolder", root=no_val, cache_dir=tmp_path)
    sizes = {
        "train": {"a": random_images(rng, 1, (4, 4)) + random_images(rng, 1, (5, 4))},
        "val": {"a": random_images(rng, 1, (4, 4))},
    }
    mixed = write_tar(tmp_path / "mixed.tar", make_tree(sizes))
    with pytest.raises(ValueError, match="train/a/0001.png in .*mixed.tar has size 5x4.*set image_size"):
        load_dataset("imagefolder", root=mixed, cache_dir=tmp_path)
    extra_class = {"train": {"a": random_images(rng, 1, (4, 4))}, "val": {"b": random_images(rng, 1, (4, 4))}}
    with pytest.raises(ValueError, match=r"val/ .* has classes missing from train/: \['b'\]"):
        load_dataset("imagefolder", root=write_tar(tmp_path / "extra.tar", make_tree(extra_class)), cache_dir=tmp_path)
    broken = dict(files, **{"train/ant/0009.png": b"not an image"})
    with pytest.raises(ValueError, match="cannot decode image train/ant/0009.png in .*broken.tar"):
        load_dataset("imagefolder", root=write_tar(tmp_path / "broken.tar", broken), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_dataset("imagefolder", root=tmp_path, image_size=0, cache_dir=tmp_path)


def test_cifar10_archive_on_a_generated_archive_in_the_real_layout(tmp_path, rng):
    classes = ["airplane", "automobile", "bird"]
    splits = {
        "train": {cls: flat_images(rng, 3, (32, 32)) for cls in classes},
        "test": {cls: flat_images(rng, 1, (32, 32)) for cls in classes},
    }
    archive = write_tar(tmp_path / "cifar10-jpeg.tar.gz", make_tree(splits, fmt="JPEG", suffix=".jpg"))
    data = load_dataset("cifar10_archive", archive=archive, cache_dir=tmp_path / "cache")
    assert data.name == "cifar10" and data.train.classes == classes
    assert (len(data.train), len(data.test), data.image_shape) == (9, 3, (3, 32, 32))
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # JPEG is lossy (chroma subsampling shifts flat colors by a few levels)
    for arrays, split in ((data.train, "train"), (data.test, "test")):
        images, _ = expected_arrays(splits[split])
        assert (arrays.images.float() - images.float()).abs().max() <= 6


def first_half_of_a_tar_gz(tmp_path, rng) -> bytes:
    """A valid image-tree .tar.gz cut in the middle, as an interrupted download leaves it."""
    splits = {"train": {"a": random_images(rng, 20, (32, 32))}, "test": {"a": random_images(rng, 2, (32, 32))}}
    full = write_tar(tmp_path / "full.tar.gz", make_tree(splits)).read_bytes()
    return full[: len(full) // 2]


@pytest.mark.parametrize("content", [b"", b"garbage, not gzip", "truncated"])
def test_corrupt_or_missing_archive_names_the_path(tmp_path, rng, content):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    if content == "truncated":
        content = first_half_of_a_tar_gz(tmp_path, rng)
    archive.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read dataset archive {archive}"):
        load_dataset("cifar10_archive", archive=archive, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=f"CIFAR-10 archive not found: {tmp_path / 'nope.tar.gz'}"):
        load_dataset("cifar10_archive", archive=tmp_path / "nope.tar.gz", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("content, problem", [
    ("random", "it starts with neither a gzip nor a tar header"),
    ("truncated", "it ends early (an interrupted download or copy?)"),
    (b"", "the file is empty"),
])
def test_an_archive_that_is_no_tar_says_so_in_the_first_line(tmp_path, rng, content, problem):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    if content == "random":
        content = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif content == "truncated":
        content = first_half_of_a_tar_gz(tmp_path, rng)
    archive.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_dataset("cifar10_archive", archive=archive, cache_dir=tmp_path / "cache")
    assert str(error.value).splitlines()[0] == (  # what the mbn-train outcome line shows
        f"cannot read dataset archive {archive}: it is not a readable tar archive (gzip or plain): {problem}; "
        "re-download it, or point the data source (data.source.archive, or data.source.root for imagefolder) "
        "at the real file"
    )


@pytest.mark.skipif(not REAL_CIFAR10_ARCHIVE.is_file(), reason=f"real CIFAR-10 archive not at {REAL_CIFAR10_ARCHIVE}")
def test_real_cifar10_archive_counts_classes_and_statistics():
    data = load_dataset("cifar10_archive", archive=REAL_CIFAR10_ARCHIVE, cache_dir=SESSION_CACHE_DIR)
    assert (len(data.train), len(data.test)) == (50000, 10000)
    assert data.image_shape == (3, 32, 32)
    assert data.train.classes == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]
    assert torch.bincount(data.train.labels).tolist() == [5000] * 10
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    # README: mean (0.4913, 0.4821, 0.4465), std (0.2452, 0.2428, 0.2606)
    assert data.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=5e-4)
    assert data.std == pytest.approx((0.2452, 0.2428, 0.2606), abs=5e-4)
