"""Batches for stacked runs: K runs' batches, each from its own loader, side by side along channels."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from mbn.data.loader import TensorBatchLoader

__all__ = ["StackedBatchLoader"]


class StackedBatchLoader:
    """Iterate ``(x, y)`` for K stacked runs: ``x`` is ``(m, K * C, H, W)``, ``y`` is ``(m, K)``.

    Channels ``[k * C, (k + 1) * C)`` of ``x`` and column ``k`` of ``y`` are the batch that
    ``loaders[k]`` yields: run k of a stack sees exactly the batches its single run sees (its
    seed's order and augmentation), in the layout :class:`~mbn.models.StackedModel` takes.

    A loader object may stand for several members: it is iterated once per epoch and its batch
    repeated. For evaluation, where every run sees the same data, pass one loader K times:
    ``StackedBatchLoader([val_loader] * K)``.

    :meth:`set_epoch` forwards to every loader; Lightning finds it through :attr:`sampler`, as
    for :class:`~mbn.data.TensorBatchLoader`. Members at different epochs: call
    ``loaders[k].set_epoch`` yourself.

    Args:
        loaders: one loader per member, all with the same batch size and number of batches.

    Raises:
        ValueError: no loaders, or loaders with different batch sizes or numbers of batches.
    """

    def __init__(self, loaders: Sequence[TensorBatchLoader]) -> None:
        self.loaders = tuple(loaders)
        if not self.loaders:
            raise ValueError("StackedBatchLoader needs at least one loader")
        first = self.loaders[0]
        for index, loader in enumerate(self.loaders[1:], 1):
            if (loader.batch_size, len(loader)) != (first.batch_size, len(first)):
                raise ValueError(
                    f"loader {index} yields {len(loader)} batches of {loader.batch_size}, loader 0 "
                    f"{len(first)} of {first.batch_size}: stacked runs need the same batches per step"
                )
        # Each distinct loader once, and which of them every member reads.
        distinct: dict[int, TensorBatchLoader] = {}
        for loader in self.loaders:
            distinct.setdefault(id(loader), loader)
        self._distinct = tuple(distinct.values())
        positions = {id(loader): position for position, loader in enumerate(self._distinct)}
        self._member_sources = tuple(positions[id(loader)] for loader in self.loaders)
        self.batch_size = first.batch_size

    @property
    def num_members(self) -> int:
        """K, the number of stacked runs."""
        return len(self.loaders)

    @property
    def sampler(self) -> "StackedBatchLoader":
        """This loader, so Lightning's ``_set_sampler_epoch`` finds :meth:`set_epoch` where it looks."""
        return self

    batch_sampler = None  # Lightning inspects it next to ``sampler``; there is none.

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch every loader produces next."""
        for loader in self._distinct:
            loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batches in zip(*self._distinct):
            members = [batches[source] for source in self._member_sources]
            sizes = {x.shape[0] for x, _ in members}
            if len(sizes) > 1:  # loaders of equal length whose last batches differ (drop_last=False)
                raise ValueError(f"the members' batches have different sizes {sorted(sizes)}; use drop_last=True or equal datasets")
            yield torch.cat([x for x, _ in members], 1), torch.stack([y for _, y in members], 1)
