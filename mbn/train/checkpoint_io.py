"""Checkpoint files that are never half-written and load without unpickling code."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from mbn.utils.io import atomic_write

# How torch's weights-only unpickler says it refused an object: with the global it names (names only, so
# nothing the file spells out, like terminal escapes, reaches the message), or, past the GLOBAL opcode,
# with the allow-list it would have needed. Any other failure is a damaged or foreign file.
_REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: GLOBAL|GLOBAL|class) ([\w.]+)")
_REFUSED_OBJECT = ("allowlisted", "unrecognized function")


def checkpoint_refusal_message(path: str | os.PathLike, exc: BaseException) -> str:
    """This project's one-line message for a checkpoint that ``torch.load(weights_only=True)`` refused.

    Names the file, whether it was refused for safety (it holds pickled objects beyond tensors and plain
    containers) or as corrupt, and what to do; a file the system could not read is not called corrupt. None of torch's own text is kept: its advice (retry with
    weights-only loading turned off, or allow-list the global) would run whatever the file holds.
    The CLI's dry run can say the same as a failed resume by passing what ``torch.load`` raised.

    Args:
        path: the checkpoint file.
        exc: the exception ``torch.load(path, weights_only=True)`` raised.

    Returns:
        ``cannot load checkpoint <path> with weights_only=True: <exception type>: refused ...; remove it ...``
    """
    if isinstance(exc, OSError) and exc.errno is not None:  # the disk or permissions: the file may be fine
        return (
            f"cannot load checkpoint {path}: {type(exc).__name__}: {exc.strerror}; fix the file's permissions "
            "or the disk and rerun (the checkpoint was not read, so keep it)"
        )
    torch_message = str(exc) if isinstance(exc, pickle.UnpicklingError) else ""
    refused_global = _REFUSED_GLOBAL.search(torch_message)
    if refused_global or any(marker in torch_message for marker in _REFUSED_OBJECT):
        content = f"it references {refused_global.group(1)}" if refused_global else "it holds a pickled object"
        why = (
            f"refused for safety: {content}, which is not a tensor or plain container and could run code when "
            "loaded (a crafted file, or one saved by other code)"
        )
    else:
        why = "refused as corrupt: it is not a complete checkpoint file (truncated, damaged or not a checkpoint)"
    return (
        f"cannot load checkpoint {path} with weights_only=True: {type(exc).__name__}: {why}; "
        "remove it to restart the run from the beginning"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: temp file + fsync + rename on save, ``weights_only=True`` on load.

    A full disk or a kill while saving leaves the previous ``last.ckpt`` as it was, so a resumed run
    never starts from a truncated file. Loading refuses anything but tensors and plain containers
    (no pickled code runs, even from a downloaded checkpoint), whatever the caller asks for.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: the state Lightning collected.
            path: destination file.
            storage_options: not supported (must be None).

        Raises:
            OSError: the write failed (e.g. ``ENOSPC``); the message names the checkpoint.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc} while saving checkpoint {path}") from exc

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Optional[Callable | str | torch.device] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Load a checkpoint with ``torch.load(..., weights_only=True)``.

        Args:
            path: checkpoint file.
            map_location: as for :func:`torch.load`.
            weights_only: ignored; loading is always weights-only.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a loadable weights-only checkpoint; the message is
                :func:`checkpoint_refusal_message`'s and the cause is what torch raised.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
            raise ValueError(checkpoint_refusal_message(path, exc)) from exc


class MemberCheckpointIO(AtomicCheckpointIO):
    """:class:`AtomicCheckpointIO` that writes into each run's dir that run's share of the job's checkpoint.

    A job's checkpoint callbacks save into their run's checkpoint dir; the dir says whose share the
    file gets (a single run's: the whole, with its config hash; a stack member's: its single-run
    checkpoint). Lightning's public checkpoint plugin, so the checkpoint callbacks stay Lightning's own.

    Args:
        shares: checkpoint dir -> the function that turns the job's checkpoint into its run's.
    """

    def __init__(self, shares: Mapping[Path, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
        super().__init__()
        self.shares = {Path(directory).resolve(): share for directory, share in shares.items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Optional[Any] = None) -> None:
        """Write the share of ``checkpoint`` that belongs to the run whose checkpoint dir holds ``path``.

        Raises:
            ValueError: ``path`` is in no run's checkpoint dir.
        """
        directory = Path(path).resolve().parent
        if directory not in self.shares:
            raise ValueError(f"checkpoint {path} is in no run's checkpoint dir of this job")
        super().save_checkpoint(self.shares[directory](checkpoint), path, storage_options)
