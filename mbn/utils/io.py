"""Crash-safe file writes: a reader never sees a half-written file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, IO, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(fileobj)`` into a temp file beside ``path``, then rename it.

    The rename is atomic on POSIX, so ``path`` holds either its old content or the complete new
    content, never a truncated one (a full disk or a kill mid-write leaves the old file intact).
    A write that fails on a full disk raises :class:`DiskFullError` naming ``path``.

    Args:
        path: destination file.
        write: callable that writes the whole content to the binary file object it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise
    try:
        # mkstemp creates 0600 files; results and reports are meant to be shared like any other file.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        full = _failed_on_full_disk(exc, path.parent)  # before the temp file frees its space
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if full and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from exc
        raise
    return path


class DiskFullError(OSError):
    """A write failed because its filesystem is full (``ENOSPC``); ``filename`` is the file not written.

    Args:
        path: the file that could not be written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def __str__(self) -> str:
        return f"the disk is full (no space left on device) writing {self.filename}"


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk (``ENOSPC``, ``EDQUOT``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def overwrite_in_place(path: str | os.PathLike, payload: bytes) -> bool:
    """Write ``payload`` over an existing file's own blocks, when it is no larger: the last way to record
    something on a full disk, where :func:`atomic_write` cannot create its temp file.

    Not atomic (a kill mid-write leaves a mix of old and new bytes), so only for a final record that
    could not be written otherwise.

    Args:
        path: an existing file.
        payload: the new content.

    Returns:
        False when the file is missing or smaller than ``payload`` (nothing was written).
    """
    try:
        with open(path, "r+b") as f:
            if os.fstat(f.fileno()).st_size < len(payload):
                return False
            f.write(payload)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except FileNotFoundError:
        return False
    return True


# Free space below which a write that failed without an errno (torch's zip writer reports a short
# write as "RuntimeError: ... unexpected pos") is taken to have hit a full disk.
_NEARLY_FULL_BYTES = 1 << 20


def _failed_on_full_disk(exc: BaseException, directory: Path) -> bool:
    if is_disk_full(exc):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    payload = json.dumps(data, indent=2, sort_keys=False, default=_json_default).encode()
    return atomic_write(path, lambda f: f.write(payload))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class FileLockBusy(RuntimeError):
    """Another process holds the lock file (:func:`hold_file_lock`)."""


@contextmanager
def hold_file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) until the block ends or the process dies.

    Args:
        path: the lock file.

    Raises:
        FileLockBusy: another process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileLockBusy(f"{path} is held by another process") from None
        yield
    finally:
        os.close(fd)


def is_file_locked(path: str | os.PathLike) -> bool:
    """Whether another process holds ``path``'s lock (:func:`hold_file_lock`); False when it does not exist.

    Args:
        path: the lock file.
    """
    path = Path(path)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False
