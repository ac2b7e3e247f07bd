"""LightningDataModule of a stacked run: each member's training batches from its own seed, shared evaluation splits."""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl

from mbn.data import StackedBatchLoader
from mbn.train.datamodule import ImageDataModule
from mbn.train.spec import DataSpec


class StackedDataModule(pl.LightningDataModule):
    """K :class:`ImageDataModule` members side by side (:class:`~mbn.data.StackedBatchLoader` layout).

    Member k's training batches are exactly those of its single run (order and augmentation from
    ``(seeds[k], epoch)``); every member is evaluated on the same validation and test batches. The
    dataset (and its held-out validation split) is loaded once and shared.

    Args:
        spec: dataset and batching settings (shared by the members).
        seeds: each member's seed.
        cache_dir: decoded-dataset cache (as for :class:`ImageDataModule`).
    """

    def __init__(self, spec: DataSpec, seeds: Sequence[int], cache_dir: str | None = None) -> None:
        super().__init__()
        self.members = [ImageDataModule(spec, seed=seed, cache_dir=cache_dir) for seed in seeds]

    def load(self) -> None:
        """Load the splits once; every member uses them (subsets depend on ``subset_seed`` only)."""
        splits = self.members[0].load()
        for member in self.members[1:]:
            member.splits = splits
            member.val_split = self.members[0].val_split

    @property
    def num_classes(self) -> int:
        """Number of classes (loads the data)."""
        return self.members[0].num_classes

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The evaluation splits' names, in the order of :meth:`val_dataloader`'s loaders."""
        return self.members[0].eval_splits

    @property
    def in_channels(self) -> int:
        """Image channels of one member (loads the data)."""
        return self.members[0].in_channels

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Training steps per epoch, the same for every member (loads the data)."""
        return self.members[0].steps_per_epoch(world_size)

    def setup(self, stage: str | None = None) -> None:
        self.load()
        # The members pick rank, world size and device from the trainer, as in a single run.
        for member in self.members:
            member.trainer = self.trainer

    def train_dataloader(self) -> StackedBatchLoader:
        return StackedBatchLoader([member.train_dataloader() for member in self.members])

    def val_dataloader(self) -> list[StackedBatchLoader]:
        """Per evaluation split, its batches given to every member."""
        return [StackedBatchLoader([loader] * len(self.members)) for loader in self.members[0].val_dataloader()]
