"""Decode once, load fast: decoded datasets cached as uint8 tensors, keyed by source fingerprint and options.

Cache files are written atomically and under an exclusive file lock, so concurrent processes (pytest
workers, parallel sweep jobs) decode at most once and never read a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mbn.data.arrays import DatasetSplits, ImageArrays
from mbn.utils.io import atomic_write

log = logging.getLogger(__name__)

# Bump when the decoded content for the same source and options changes (invalidates old caches).
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$MBN_CACHE_DIR`` if set, else ``~/.cache/mbn``."""
    env = os.environ.get("MBN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mbn"


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identify a source file or directory tree by path, sizes and modification times (no content hashing).

    Args:
        path: an existing file or directory.
    """
    path = Path(path).resolve()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        digest = hashlib.sha256()
        count = 0
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for filename in sorted(filenames):
                file = Path(dirpath, filename)
                stat = file.stat()
                digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                count += 1
        return {"path": str(path), "files": count, "tree_sha256": digest.hexdigest()}
    raise FileNotFoundError(f"dataset source not found: {path}")


def cache_path(cache_dir: str | os.PathLike, name: str, key: dict[str, Any]) -> Path:
    """File in ``cache_dir`` for dataset ``name`` decoded from the source and options in ``key``."""
    blob = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, default=str).encode()
    return Path(cache_dir) / f"{name}-{hashlib.sha256(blob).hexdigest()[:20]}.pt"


def cached_splits(
    cache_dir: str | os.PathLike | None, name: str, key: dict[str, Any], decode: Callable[[], DatasetSplits]
) -> DatasetSplits:
    """Return the cached dataset for ``key``, or ``decode()`` it, cache it and return it.

    Args:
        cache_dir: cache directory (created if missing); ``None`` = :func:`default_cache_dir`.
        name: dataset name, used in the file name.
        key: everything the decoded content depends on (source fingerprint, decode options).
        decode: builds the dataset when no valid cache file exists.
    """
    path = cache_path(default_cache_dir() if cache_dir is None else cache_dir, name, key)
    splits = _try_load(path)
    if splits is not None:
        return splits
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.with_name(path.name + ".lock")):
        splits = _try_load(path)  # another process may have finished decoding while we waited
        if splits is not None:
            return splits
        splits = decode()
        payload = {
            "format": CACHE_FORMAT,
            "name": splits.name,
            "classes": list(splits.train.classes),
            "mean": list(splits.mean),
            "std": list(splits.std),
            "train_images": splits.train.images,
            "train_labels": splits.train.labels,
            "test_images": splits.test.images,
            "test_labels": splits.test.labels,
        }
        atomic_write(path, lambda f: torch.save(payload, f))
        log.info("cached decoded dataset %s at %s", name, path)
        return splits


def _try_load(path: Path) -> DatasetSplits | None:
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CACHE_FORMAT:
            return None
        classes = list(payload["classes"])
        return DatasetSplits(
            name=payload["name"],
            train=ImageArrays(payload["train_images"], payload["train_labels"], classes),
            test=ImageArrays(payload["test_images"], payload["test_labels"], classes),
            mean=tuple(payload["mean"]),
            std=tuple(payload["std"]),
        )
    except Exception as exc:  # unreadable cache is never fatal: decode again and overwrite it
        log.warning("ignoring unreadable dataset cache %s (%s: %s)", path, type(exc).__name__, exc)
        return None


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path`` exclusively; the file is removed on release (decoded or not: no stale locks).

    A process that waited on a file removed meanwhile finds the path no longer names the file it
    locked, and locks the new one instead, so two processes never hold the lock at once.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)  # while still holding it: waiters then re-open a fresh file
        except FileNotFoundError:
            pass
        os.close(fd)
