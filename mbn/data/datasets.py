"""``load_dataset(kind, **kwargs)``: one entry point for every supported dataset (the ``data.*`` config keys)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

from mbn.data.arrays import DatasetSplits, channel_stats
from mbn.data.cache import cache_path, cached_splits, default_cache_dir, source_fingerprint
from mbn.data.cifar_pickle import cifar_folder, download_cifar, read_cifar
from mbn.data.fake import make_fake_splits
from mbn.data.image_tree import decode_image_tree
from mbn.data.memory import check_fits_in_memory, decoded_bytes

PathLike = str | os.PathLike


def _splits(name: str, train, test) -> DatasetSplits:
    mean, std = channel_stats(train.images)
    return DatasetSplits(name=name, train=train, test=test, mean=mean, std=std)


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def load_cifar10_archive(archive: PathLike, cache_dir: PathLike | None = None) -> DatasetSplits:
    """The real CIFAR-10 stored as JPEGs in a tar.gz (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).

    Args:
        archive: path to the archive (e.g. ``../shared/data/cifar10-jpeg.tar.gz``).
        cache_dir: where the decoded arrays are cached; ``None`` = ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive not found: {archive}")
    key = {"kind": "cifar10_archive", "source": source_fingerprint(archive)}
    decode = lambda: _splits("cifar10", *decode_image_tree(archive, "train", "test", None))  # noqa: E731
    return cached_splits(cache_dir, "cifar10_archive", key, decode)


def _load_cifar(name: str, root: PathLike, download: bool, cache_dir: PathLike | None) -> DatasetSplits:
    folder = cifar_folder(name, root)
    if download and not folder.is_dir():
        download_cifar(name, root)
    if not folder.is_dir():  # read_cifar gives the helpful message
        read_cifar(name, root)
    key = {"kind": name, "source": source_fingerprint(folder)}
    return cached_splits(cache_dir, name, key, lambda: _splits(name, *read_cifar(name, root)))


def load_cifar10(root: PathLike, download: bool = False, cache_dir: PathLike | None = None) -> DatasetSplits:
    """CIFAR-10 in torchvision's layout (``root/cifar-10-batches-py``).

    Args:
        root: directory containing ``cifar-10-batches-py/``.
        download: fetch it with torchvision if missing (needs network access).
        cache_dir: where the decoded arrays are cached; ``None`` = ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``.
    """
    return _load_cifar("cifar10", root, download, cache_dir)


def load_cifar100(root: PathLike, download: bool = False, cache_dir: PathLike | None = None) -> DatasetSplits:
    """CIFAR-100 (100 fine labels) in torchvision's layout (``root/cifar-100-python``).

    Args:
        root: directory containing ``cifar-100-python/``.
        download: fetch it with torchvision if missing (needs network access).
        cache_dir: where the decoded arrays are cached; ``None`` = ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``.
    """
    return _load_cifar("cifar100", root, download, cache_dir)


def load_imagefolder(
    root: PathLike,
    image_size: int | None = None,
    cache_dir: PathLike | None = None,
    train_dir: str = "train",
    val_dir: str = "val",
) -> DatasetSplits:
    """Any ``train/<class>/<image>`` + ``val/<class>/<image>`` tree, e.g. Mini-ImageNet (``image_size=84``).

    The whole dataset is decoded into memory as uint8, so it suits datasets up to a few GB decoded
    (Mini-ImageNet at 84px: ~1.3 GB), not full ImageNet (~190 GB at 224 px): the decoded size is
    estimated first, and a dataset larger than the memory available raises :class:`~mbn.data.memory.DatasetTooLarge`
    before anything is decoded (:mod:`mbn.data.streaming` reads such datasets from disk).

    Args:
        root: the directory holding ``train_dir/`` and ``val_dir/``, or a .tar / .tar.gz of it.
        image_size: resize every image to ``image_size x image_size``; ``None`` requires equal sizes.
        cache_dir: where the decoded arrays are cached; ``None`` = ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``.
        train_dir: training split folder name.
        val_dir: evaluation split folder name.
    """
    if image_size is not None:
        _check_positive(image_size=image_size)
    root = Path(root)
    name = root.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar") or "imagefolder"
    key = {
        "kind": "imagefolder",
        "source": source_fingerprint(root),
        "image_size": image_size,
        "train_dir": train_dir,
        "val_dir": val_dir,
    }
    cached = cache_path(default_cache_dir() if cache_dir is None else cache_dir, f"imagefolder-{name}", key)
    if cached.exists():  # the cache file holds the decoded arrays: its size is what loading it needs
        check_fits_in_memory(f"imagefolder {root}", cached.stat().st_size)
    else:
        needed, images, size = decoded_bytes(root, (train_dir, val_dir), image_size)
        check_fits_in_memory(f"imagefolder {root}", needed, images, size)
    return cached_splits(
        cache_dir,
        f"imagefolder-{name}",
        key,
        lambda: _splits(name, *decode_image_tree(root, train_dir, val_dir, image_size)),
    )


def load_imagenet(
    root: PathLike,
    image_size: int = 224,
    cache_dir: PathLike | None = None,
    train_dir: str = "train",
    val_dir: str = "val",
) -> DatasetSplits:
    """ImageNet's usual layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) in memory: see
    :func:`load_imagefolder`, whose size check stops full ImageNet (stream it with
    :mod:`mbn.data.streaming` instead); a subset of it (e.g. 100 classes at 128 px) may fit.

    Args:
        root: the directory holding ``train_dir/`` and ``val_dir/``.
        image_size: resize every image to ``image_size x image_size``.
        cache_dir: where the decoded arrays are cached; ``None`` = ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``.
        train_dir: training split folder name.
        val_dir: evaluation split folder name.
    """
    return load_imagefolder(root, image_size, cache_dir, train_dir, val_dir)


def load_fake(
    num_train: int = 512,
    num_test: int = 128,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> DatasetSplits:
    """Generated learnable data (class-dependent patterns plus noise); see :func:`mbn.data.fake.make_fake_splits`.

    Args:
        num_train: training images.
        num_test: test images.
        num_classes: classes (>= 2).
        image_size: height and width.
        channels: image channels.
        seed: the data is a deterministic function of all arguments.
    """
    _check_positive(
        num_train=num_train, num_test=num_test, num_classes=num_classes, image_size=image_size, channels=channels
    )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return _splits("fake", *make_fake_splits(num_train, num_test, num_classes, image_size, channels, seed))


_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "cifar10_archive": load_cifar10_archive,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "imagenet": load_imagenet,
    "fake": load_fake,
}
DATASET_KINDS: tuple[str, ...] = tuple(_LOADERS)


def dataset_arguments(kind: str) -> tuple[str, ...]:
    """The keyword arguments :func:`load_dataset` accepts for ``kind``."""
    return tuple(inspect.signature(_loader(kind)).parameters)


def load_dataset(kind: str, **kwargs: Any) -> DatasetSplits:
    """Load (decoding once, then from cache) the dataset ``kind`` with its options.

    Args:
        kind: one of :data:`DATASET_KINDS`.
        **kwargs: that kind's options (see ``load_<kind>``), e.g. ``archive``/``cache_dir`` for
            ``cifar10_archive``; unknown or missing options raise ``ValueError``.
    """
    loader = _loader(kind)
    try:
        inspect.signature(loader).bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(dataset_arguments(kind))
        unknown = sorted(set(kwargs) - set(dataset_arguments(kind)))
        problem = f"unknown argument(s) {', '.join(unknown)}" if unknown else str(exc)
        raise ValueError(f"dataset kind {kind!r}: {problem}; accepted arguments: {accepted}") from None
    return loader(**kwargs)


def _loader(kind: str) -> Callable[..., DatasetSplits]:
    if kind not in _LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    return _LOADERS[kind]
