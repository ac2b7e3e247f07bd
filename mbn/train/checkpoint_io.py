"""Checkpoint files that are never half-written and load without unpickling code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from mbn.utils.io import atomic_write


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
            ValueError: the file is not a loadable weights-only checkpoint.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"cannot load checkpoint {path} with weights_only=True: {type(exc).__name__}: {first_line}") from exc
