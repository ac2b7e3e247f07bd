"""Decode ``<split>/<class>/<image>`` trees (a directory, or a .tar / .tar.gz of one) into uint8 arrays."""

from __future__ import annotations

import io
import logging
import lzma
import os
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mbn.data.arrays import ImageArrays

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp"})


def decode_image_tree(
    source: str | os.PathLike, train_dir: str, val_dir: str, image_size: int | None
) -> tuple[ImageArrays, ImageArrays]:
    """Decode the train and validation splits of a class-folder tree.

    Classes are the sorted folder names under ``train_dir`` (index = label); images within a class are
    taken in sorted file-name order, so the result does not depend on file system or archive order.
    An archive may wrap the tree in one top-level folder.

    Args:
        source: directory containing ``train_dir/`` and ``val_dir/``, or a tar archive (any compression) of one.
        train_dir: name of the training split folder.
        val_dir: name of the evaluation split folder.
        image_size: resize every image to ``image_size x image_size`` (bilinear); ``None`` keeps the stored
            size, which must then be the same for all images.

    Returns:
        ``(train, val)`` as RGB uint8 arrays.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    if train_dir == val_dir:
        raise ValueError(f"train_dir and val_dir must differ, both are {train_dir!r}")
    start = time.perf_counter()
    if source.is_dir():
        entries = _directory_entries(source, (train_dir, val_dir))
        decoded = _decode_all(entries, source, image_size, total=len(entries))
    else:
        decoded = _decode_all(_tar_entries(source, (train_dir, val_dir)), source, image_size, total=None)
    classes = sorted({cls for (split, cls, _) in decoded if split == train_dir})
    if not classes:
        raise ValueError(f"no images found under {train_dir}/<class>/ in {source}")
    unknown = sorted({cls for (split, cls, _) in decoded if split == val_dir} - set(classes))
    if unknown:
        raise ValueError(f"{val_dir}/ in {source} has classes missing from {train_dir}/: {unknown[:10]}")
    splits = tuple(_stack(decoded, split, classes, source) for split in (train_dir, val_dir))
    log.info(
        "decoded %d + %d images from %s in %.1f s",
        len(splits[0]), len(splits[1]), source, time.perf_counter() - start,
    )
    return splits  # type: ignore[return-value]


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized to ``size`` x ``size`` (bilinear); unchanged when it already is that size."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)


def is_image(name: str) -> bool:
    """Whether a file name is an image of the tree (a known extension, not hidden)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _directory_entries(root: Path, split_dirs: tuple[str, str]) -> list[tuple[tuple[str, str, str], Path]]:
    entries = []
    for split in split_dirs:
        split_root = root / split
        if not split_root.is_dir():
            raise FileNotFoundError(f"missing split folder {split_root} (expected {split}/<class>/<image>)")
        for class_dir in sorted(p for p in split_root.iterdir() if p.is_dir()):
            for file in sorted(class_dir.iterdir()):
                if file.is_file() and is_image(file.name):
                    entries.append(((split, class_dir.name, file.name), file))
    return entries


def _tar_entries(archive: Path, split_dirs: tuple[str, str]) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    prefix: tuple[str, ...] | None = None
    opened = False
    try:
        with tarfile.open(archive, "r:*") as tar:
            opened = True
            for member in tar:
                if not member.isfile():
                    continue
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in (".", "/"))
                if len(parts) < 3 or parts[-3] not in split_dirs or not is_image(parts[-1]):
                    continue
                if prefix is None:
                    prefix = parts[:-3]
                elif parts[:-3] != prefix:
                    raise ValueError(
                        f"{archive} holds more than one dataset tree: {'/'.join(prefix) or '.'} and "
                        f"{'/'.join(parts[:-3]) or '.'}"
                    )
                file = tar.extractfile(member)
                assert file is not None  # regular file members always have content
                yield (parts[-3], parts[-2], parts[-1]), file.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the disk or permissions, not the content
            raise ValueError(f"cannot read dataset archive {archive}: {type(exc).__name__}: {exc}") from exc
        # One line: the mbn-train outcome shows only the first line of the message.
        raise ValueError(
            f"cannot read dataset archive {archive}: it is not a readable tar archive (gzip or plain): "
            f"{_archive_problem(archive, exc, opened)}; re-download it, or point the data source "
            "(data.source.archive, or data.source.root for imagefolder) at the real file"
        ) from exc


def _archive_problem(archive: Path, exc: BaseException, opened: bool) -> str:
    """Why ``archive`` is not a readable tar, in a few words; ``opened``: ``tarfile.open`` had succeeded."""
    if archive.stat().st_size == 0:
        return "the file is empty"
    if not opened and isinstance(exc, tarfile.ReadError):  # tarfile tried every compression it knows
        with open(archive, "rb") as f:
            gzip_magic = f.read(2) == b"\x1f\x8b"
        return "it is gzip data that holds no tar" if gzip_magic else "it starts with neither a gzip nor a tar header"
    if isinstance(exc, EOFError) or str(exc) == "unexpected end of data":
        return "it ends early (an interrupted download or copy?)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _decode_all(
    entries, source: Path, image_size: int | None, total: int | None
) -> dict[tuple[str, str, str], np.ndarray]:
    decoded: dict[tuple[str, str, str], np.ndarray] = {}
    first_shape: tuple[int, ...] | None = None
    progress = tqdm(entries, total=total, desc=f"decoding {source.name}", unit="img", mininterval=1.0, disable=None)
    for key, content in progress:
        where = f"{'/'.join(key)} in {source}"
        try:
            with Image.open(content if isinstance(content, Path) else io.BytesIO(content)) as image:
                image = image.convert("RGB")
                if image_size is not None:
                    image = resize_square(image, image_size)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot decode image {where}: {exc}") from exc
        if first_shape is None:
            first_shape = array.shape
        elif array.shape != first_shape:
            raise ValueError(
                f"image {where} has size {array.shape[1]}x{array.shape[0]}, others {first_shape[1]}x{first_shape[0]}; "
                "set image_size to resize all images to one size"
            )
        decoded[key] = array
    return decoded


def _stack(
    decoded: dict[tuple[str, str, str], np.ndarray], split: str, classes: list[str], source: Path
) -> ImageArrays:
    class_index = {name: i for i, name in enumerate(classes)}
    keys = sorted((key for key in decoded if key[0] == split), key=lambda k: (class_index[k[1]], k[2]))
    if not keys:
        raise ValueError(f"no images found under {split}/<class>/ in {source}")
    images = np.stack([decoded.pop(key) for key in keys])  # N x H x W x C
    images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    labels = torch.tensor([class_index[key[1]] for key in keys], dtype=torch.int64)
    return ImageArrays(images, labels, classes)
