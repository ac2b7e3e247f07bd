"""LightningDataModule over :mod:`mbn.data`: cached in-memory splits and :class:`TensorBatchLoader`."""

from __future__ import annotations

import pytorch_lightning as pl

from mbn.data import DatasetSplits, TensorBatchLoader, dataset_arguments, load_dataset
from mbn.train.spec import DataSpec


class ImageDataModule(pl.LightningDataModule):
    """Training batches of exactly ``batch_size`` samples per device; evaluation on the test split.

    Each training epoch's order and augmentation depend only on ``(seed, epoch)`` (Lightning calls
    the loader's ``set_epoch``), so a run resumed from an epoch-end checkpoint sees the same data as
    an uninterrupted one.

    Args:
        spec: dataset and batching settings.
        seed: seed of the shuffle order and augmentation.
        cache_dir: decoded-dataset cache for kinds that take one (``None`` = :mod:`mbn.data`'s default).
    """

    def __init__(self, spec: DataSpec, seed: int = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.seed = seed
        self.cache_dir = cache_dir
        self.splits: DatasetSplits | None = None

    def load(self) -> DatasetSplits:
        """Load the splits (from cache after the first time), applying the configured subsets."""
        if self.splits is None:
            source = self.spec.source_options
            if self.cache_dir is not None and "cache_dir" in dataset_arguments(self.spec.name):
                source.setdefault("cache_dir", self.cache_dir)
            splits = load_dataset(self.spec.name, **source)
            if self.spec.train_subset is not None:
                splits.train = splits.train.subset(min(self.spec.train_subset, len(splits.train)), self.spec.subset_seed)
            if self.spec.test_subset is not None:
                splits.test = splits.test.subset(min(self.spec.test_subset, len(splits.test)), self.spec.subset_seed)
            self.splits = splits
        return self.splits

    @property
    def num_classes(self) -> int:
        """Number of classes (loads the data)."""
        return self.load().num_classes

    @property
    def in_channels(self) -> int:
        """Image channels (loads the data)."""
        return self.load().image_shape[0]

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _device(self) -> str:
        # Keep the data where the model is: on a GPU the crop/flip/normalize pass runs there too.
        trainer = self.trainer
        return "cpu" if trainer is None else str(trainer.strategy.root_device)

    def train_dataloader(self) -> TensorBatchLoader:
        splits = self.load()
        rank, world_size = self._rank_and_world()
        return TensorBatchLoader(
            splits.train,
            self.spec.batch_size,
            mean=splits.mean,
            std=splits.std,
            shuffle=True,
            drop_last=True,
            augment=self.spec.augment,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            crop_padding=self.spec.crop_padding,
            device=self._device(),
        )

    def val_dataloader(self) -> TensorBatchLoader:
        splits = self.load()
        rank, world_size = self._rank_and_world()
        return TensorBatchLoader(
            splits.test,
            self.spec.eval_batch_size,
            mean=splits.mean,
            std=splits.std,
            shuffle=False,
            drop_last=False,
            augment=False,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            device=self._device(),
        )
