"""LightningDataModule over :mod:`mbn.data`: cached in-memory splits and :class:`TensorBatchLoader`, or
class-folder trees streamed from disk by :class:`~mbn.data.streaming.StreamingBatchLoader`."""

from __future__ import annotations

import pytorch_lightning as pl

from mbn.data import DatasetSplits, ImageArrays, TensorBatchLoader, dataset_arguments, load_dataset, stratified_holdout
from mbn.data.epoch_split import EpochSplit
from mbn.data.streaming import FileSplits, ImageFiles, StreamingBatchLoader, open_image_folder
from mbn.train.spec import DataSpec, SpecError


class ImageDataModule(pl.LightningDataModule):
    """Training batches of exactly ``batch_size`` samples per device; evaluation on the validation
    split (``data.val_subset``, when set) and the test split, in :attr:`eval_splits` order.

    The validation split is held out of the whole training split first (``val_subset`` images,
    stratified by class, chosen by ``subset_seed``); ``train_subset`` then takes its images from
    the rest, so the two never share an image and a run without ``train_subset`` trains on every
    training image but the held-out ones. The normalization statistics stay those of the whole
    training split (as with ``train_subset``).

    Each training epoch's order and augmentation depend only on ``(seed, epoch)`` (Lightning calls
    the loader's ``set_epoch``), so a run resumed from an epoch-end checkpoint sees the same data as
    an uninterrupted one, in memory or streamed (``spec.streams``).

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
        self.splits: DatasetSplits | FileSplits | None = None
        # The validation split held out of the training split (None without data.val_subset).
        self.val_split: ImageArrays | ImageFiles | None = None
        self._streaming_loaders: list[StreamingBatchLoader] = []

    def load(self) -> DatasetSplits | FileSplits:
        """Load the splits (decoded, from cache after the first time; or listed, when streaming),
        applying the configured subsets."""
        if self.splits is None:
            source = self.spec.source_options
            if self.spec.streams:
                splits = open_image_folder(source["root"], source["image_size"], source["train_dir"], source["val_dir"],
                                           mean=self.spec.mean, std=self.spec.std, num_workers=self.spec.num_workers)
            else:
                if self.cache_dir is not None and "cache_dir" in dataset_arguments(self.spec.name):
                    source.setdefault("cache_dir", self.cache_dir)
                splits = load_dataset(self.spec.name, **source)
            if self.spec.val_subset is not None:
                self.val_split, splits.train = hold_out(splits.train, self.spec.val_subset, self.spec.subset_seed)
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
    def eval_splits(self) -> tuple[str, ...]:
        """The evaluation splits' names, in the order of :meth:`val_dataloader`'s loaders."""
        return self.spec.eval_splits

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Training batches (optimizer steps) per epoch on each of ``world_size`` devices (loads the data)."""
        return EpochSplit(len(self.load().train), self.spec.batch_size, 0, world_size, drop_last=True).num_batches

    @property
    def in_channels(self) -> int:
        """Image channels (loads the data)."""
        return self.load().image_shape[0]

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def teardown(self, stage: str | None = None) -> None:
        self._stop_workers()

    def on_exception(self, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: the workers must still stop with the run.
        self._stop_workers()

    def _stop_workers(self) -> None:
        for loader in self._streaming_loaders:
            loader.close()

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _device(self) -> str:
        # Keep the data where the model is: on a GPU the crop/flip/normalize pass runs there too.
        trainer = self.trainer
        return "cpu" if trainer is None else str(trainer.strategy.root_device)

    def train_dataloader(self) -> TensorBatchLoader | StreamingBatchLoader:
        return self._loader(self.load().train, train=True)

    def val_dataloader(self) -> list[TensorBatchLoader | StreamingBatchLoader]:
        """One loader per evaluation split (:attr:`eval_splits`): the validation split's, then the test split's."""
        splits = self.load()
        by_name = {"val": self.val_split, "test": splits.test}
        return [self._loader(by_name[name], train=False) for name in self.eval_splits]

    def _loader(self, split: ImageArrays | ImageFiles, train: bool) -> TensorBatchLoader | StreamingBatchLoader:
        splits = self.load()
        rank, world_size = self._rank_and_world()
        common = dict(
            mean=splits.mean, std=splits.std, shuffle=train, drop_last=train, augment=train and self.spec.augment,
            seed=self.seed, rank=rank, world_size=world_size, device=self._device(),
        )
        batch_size = self.spec.batch_size if train else self.spec.eval_batch_size
        if isinstance(splits, FileSplits):
            loader = StreamingBatchLoader(split, batch_size, image_size=splits.image_size, evaluation=not train,
                                          num_workers=self.spec.num_workers, **common)
            self._streaming_loaders.append(loader)
            return loader
        return TensorBatchLoader(split, batch_size, crop_padding=self.spec.crop_padding, **common)


def hold_out(split: ImageArrays | ImageFiles, n: int, seed: int) -> tuple[ImageArrays | ImageFiles, ImageArrays | ImageFiles]:
    """``(held_out, rest)``: ``n`` images of ``split`` (:func:`~mbn.data.stratified_holdout`) and the others.

    Args:
        split: the training split.
        n: images held out (``data.val_subset``).
        seed: which images (``data.subset_seed``).

    Raises:
        SpecError: ``n`` is not smaller than the split (a dataset whose size the schema cannot know).
    """
    if n >= len(split):
        raise SpecError("data.val_subset", f"must be smaller than the {len(split)} training images, got {n}")
    held_out, rest = stratified_holdout(split.labels, len(split.classes), n, seed)
    return split.take(held_out), split.take(rest)
