"""Will a decoded dataset fit? The in-memory path's estimate, made before it decodes anything.

The in-memory path holds every image as uint8 (C x H x W bytes each): Mini-ImageNet at 84 px is
~1.3 GB, ImageNet at 224 px ~190 GB. Counting the images and reading one header is enough to know,
so a dataset that cannot fit stops at start-up instead of after hours of decoding, or in the OOM killer.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path, PurePosixPath

from PIL import Image

from mbn.data.image_tree import is_image

CHANNELS = 3  # decoded as RGB


class DatasetTooLarge(MemoryError):
    """The decoded dataset would not fit into the memory available; ``str()`` is the one-line message."""


def available_memory_bytes() -> int:
    """Memory this process can still use: the kernel's MemAvailable, capped by a cgroup v2 limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available)


def count_images(source: str | os.PathLike, split_dirs: tuple[str, ...]) -> tuple[int, Path | bytes | None]:
    """Images under ``<split>/<class>/`` of a directory tree or tar archive, and one of them (its path or bytes).

    Args:
        source: the tree's root directory, or a tar archive of it.
        split_dirs: split folder names, e.g. ``("train", "val")``.
    """
    source = Path(source)
    count, example = 0, None
    if source.is_dir():
        for split in split_dirs:
            split_root = source / split
            class_dirs = [entry.path for entry in os.scandir(split_root) if entry.is_dir()] if split_root.is_dir() else []
            for class_dir in class_dirs:
                images = [entry.path for entry in os.scandir(class_dir) if entry.is_file() and is_image(entry.name)]
                count += len(images)
                if example is None and images:
                    example = Path(images[0])
        return count, example
    with tarfile.open(source, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in split_dirs and is_image(parts[-1]):
                count += 1
                if example is None:
                    example = tar.extractfile(member).read()
    return count, example


def decoded_bytes(source: str | os.PathLike, split_dirs: tuple[str, ...], image_size: int | None) -> tuple[int, int, str]:
    """(bytes, images, image size as ``HxW``) of a class-folder tree decoded into uint8 arrays.

    Args:
        source: the tree's root directory, or a tar archive of it.
        split_dirs: split folder names.
        image_size: the side images are resized to; ``None`` = their stored size (one image is read).
    """
    count, example = count_images(source, split_dirs)
    if image_size is not None:
        height = width = image_size
    elif example is None:
        height = width = 0
    else:
        with Image.open(example if isinstance(example, Path) else io.BytesIO(example)) as image:
            width, height = image.size
    return count * CHANNELS * height * width, count, f"{height}x{width}"


def check_fits_in_memory(what: str, needed: int, images: int | None = None, size: str | None = None) -> None:
    """Raise :class:`DatasetTooLarge` when ``needed`` bytes exceed :func:`available_memory_bytes`.

    Args:
        what: the dataset, for the message (e.g. ``imagefolder /data/imagenet``).
        needed: decoded size in bytes.
        images: how many images that is (for the message).
        size: their decoded ``HxW`` (for the message).
    """
    available = available_memory_bytes()
    if needed <= available:
        return
    detail = f" ({images:,} images at {size})" if images is not None and size else ""
    raise DatasetTooLarge(
        f"{what}: decoding it into memory needs {needed / 1e9:.1f} GB{detail}, {available / 1e9:.1f} GB are "
        "available; stream the images from disk instead with data.in_memory=false"
    )
