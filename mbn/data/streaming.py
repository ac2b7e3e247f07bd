"""Class-folder trees too large for memory (ImageNet): read from disk batch by batch, reproducibly.

torchvision's ``ImageFolder`` lists the files; a ``DataLoader`` with worker processes (pinned memory,
persistent workers) decodes and transforms them; batches leave as uint8 and are normalized on the
device, like :class:`~mbn.data.loader.TensorBatchLoader`'s. Training uses the standard ImageNet
augmentation (random-resized crop + horizontal flip), evaluation resize + center crop (the short side
to ``image_size * 8/7``: 256 for 224).

Reproducible as the in-memory path: an epoch's order is :class:`~mbn.data.epoch_split.EpochSplit`'s
(a function of ``(seed, epoch)``, the same order the in-memory loader draws), and each image's
augmentation draws from its own generator seeded by ``(seed, epoch, index)``, so neither the number
of workers nor an interrupted and resumed run changes a batch. Without augmentation the training
images are resized to ``image_size`` x ``image_size`` exactly as the in-memory path decodes them, so
both paths give the same batches.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import pil_loader
from torchvision.transforms.functional import pil_to_tensor

from mbn.data.arrays import channel_stats, stratified_subset
from mbn.data.epoch_split import EpochSplit, epoch_generator, mix_seed
from mbn.data.image_tree import is_image, resize_square
from mbn.utils.library_internals import stop_dataloader_workers

# Training images the normalization statistics are estimated from when none are given.
STATS_IMAGES = 2000
# Evaluation resizes the short side to image_size / EVAL_CROP_FRACTION, then center-crops (256 -> 224).
EVAL_CROP_FRACTION = 7 / 8
CHANNELS = 3  # images are decoded as RGB

__all__ = ["ImageFiles", "FileSplits", "StreamingBatchLoader", "open_image_folder"]


@dataclass
class ImageFiles:
    """One split of a class-folder tree as files: ``(path, label)`` in ImageFolder's (sorted) order.

    Args:
        samples: ``(path, class index)`` per image.
        classes: class names; index = label.
    """

    samples: list[tuple[str, int]]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        """int64 label of every sample."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def subset(self, n: int, seed: int) -> "ImageFiles":
        """The same ``n`` samples :meth:`mbn.data.arrays.ImageArrays.subset` picks, in dataset order."""
        return self.take(stratified_subset(self.labels, len(self.classes), n, seed))

    def take(self, indices: torch.Tensor) -> "ImageFiles":
        """The samples at ``indices`` (int64), in that order.

        Args:
            indices: sample indices.
        """
        return ImageFiles([self.samples[i] for i in indices.tolist()], self.classes)


@dataclass
class FileSplits:
    """A class-folder tree's splits as files, the decoded image size and the normalization statistics.

    Args:
        name: dataset identifier (the root's folder name).
        train: training split.
        test: evaluation split (``val/``).
        image_size: side of the images the loaders produce.
        mean: per-channel mean, [0, 1] pixel units.
        std: per-channel standard deviation, [0, 1] pixel units.
    """

    name: str
    train: ImageFiles
    test: ImageFiles
    image_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return CHANNELS, self.image_size, self.image_size


class _TrainClassesFolder(ImageFolder):
    """An ImageFolder whose labels are the given classes' (a validation split with train's class indices)."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self._given_classes = classes
        super().__init__(root, is_valid_file=is_image_path, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._given_classes), {name: i for i, name in enumerate(self._given_classes)}


def is_image_path(path: str) -> bool:
    """:func:`mbn.data.image_tree.is_image` for a path: both data paths see the same files."""
    return is_image(os.path.basename(path))


def open_image_folder(
    root: str | os.PathLike,
    image_size: int,
    train_dir: str = "train",
    val_dir: str = "val",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_workers: int = 4,
) -> FileSplits:
    """List a ``train/<class>/<image>`` + ``val/<class>/<image>`` tree (nothing is decoded but the statistics' sample).

    Args:
        root: the directory holding ``train_dir/`` and ``val_dir/`` (not an archive).
        image_size: side of the images the loaders produce.
        train_dir: training split folder name.
        val_dir: evaluation split folder name.
        mean: per-channel mean; ``None`` (with ``std``) = estimated from :data:`STATS_IMAGES`
            training images spread evenly over the split (all of them in a smaller one).
        std: per-channel standard deviation; ``None`` with ``mean``.
        num_workers: processes that decode the statistics' sample.

    Raises:
        FileNotFoundError: a split folder is missing, or empty.
        ValueError: ``val_dir`` has classes that ``train_dir`` lacks, or only one of mean/std is given.
    """
    root = os.fspath(root)
    for split in (train_dir, val_dir):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"missing split folder {os.path.join(root, split)} (expected {split}/<class>/<image>)")
    train = ImageFolder(os.path.join(root, train_dir), is_valid_file=is_image_path)
    val_root = os.path.join(root, val_dir)
    unknown = sorted({entry.name for entry in os.scandir(val_root) if entry.is_dir()} - set(train.classes))
    if unknown:
        raise ValueError(f"{val_dir}/ in {root} has classes missing from {train_dir}/: {unknown[:10]}")
    val = _TrainClassesFolder(val_root, train.classes)
    if not val.samples:
        raise FileNotFoundError(f"no images found under {val_dir}/<class>/ in {root}")
    splits = FileSplits(
        name=os.path.basename(os.path.normpath(root)) or "imagefolder",
        train=ImageFiles(list(train.samples), list(train.classes)),
        test=ImageFiles(list(val.samples), list(train.classes)),
        image_size=image_size,
    )
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither (then both are estimated)")
    if mean is None:
        mean, std = estimate_channel_stats(splits.train, image_size, num_workers)
    splits.mean, splits.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return splits


def estimate_channel_stats(
    files: ImageFiles, image_size: int, num_workers: int, max_images: int = STATS_IMAGES
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``max_images`` images spread evenly over ``files``.

    The images are resized as the in-memory path decodes them, and the statistics computed as it
    computes them (:func:`~mbn.data.arrays.channel_stats`), so for a split of at most ``max_images``
    images both paths normalize identically.
    """
    count = len(files)
    indices = torch.linspace(0, count - 1, max_images).round().long().unique() if count > max_images else torch.arange(count)
    dataset = _SeededImages(files.samples, image_size, mode="square", seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=[(0, int(i)) for i in indices], num_workers=num_workers,
                        worker_init_fn=_one_thread)
    images = torch.cat([x for x, _ in loader])
    return channel_stats(images)


def _one_thread(worker_id: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)


class _SeededImages(Dataset):
    """``dataset[(epoch, index)]`` -> (uint8 C x H x W image, label), its randomness seeded by (seed, epoch, index).

    Args:
        samples: ``(path, label)`` per image.
        image_size: output side.
        mode: ``augment`` (random-resized crop + flip), ``square`` (resized to image_size x image_size,
            as the in-memory path decodes) or ``eval`` (resize + center crop).
        seed: the run's seed.
    """

    def __init__(self, samples: list[tuple[str, int]], image_size: int, mode: str, seed: int) -> None:
        self.samples = samples
        self.image_size = image_size
        self.mode = mode
        self.seed = seed
        if mode == "augment":
            self.transform = transforms.Compose([transforms.RandomResizedCrop(image_size, antialias=True),
                                                 transforms.RandomHorizontalFlip()])
        elif mode == "eval":
            self.transform = transforms.Compose([transforms.Resize(round(image_size / EVAL_CROP_FRACTION), antialias=True),
                                                 transforms.CenterCrop(image_size)])
        elif mode == "square":
            self.transform = functools.partial(resize_square, size=image_size)
        else:
            raise ValueError(f"mode must be augment, square or eval, got {mode!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        path, label = self.samples[index]
        try:
            image = pil_loader(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot decode image {path}: {exc}") from exc
        if self.mode == "augment":
            # torchvision's random transforms draw from the global generator: give each image its own
            # stream, without disturbing the worker's (or, with num_workers=0, the trainer's) state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, epoch, index))
                image = self.transform(image)
        else:
            image = self.transform(image)
        return pil_to_tensor(image), label


class _EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank's share of the epoch, in :class:`EpochSplit`'s order.

    The epoch travels with each index, so persistent workers (which keep their own copy of the
    dataset) need no state that changes between epochs.
    """

    def __init__(self, split: EpochSplit, seed: int, shuffle: bool) -> None:
        self.split = split
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices of ``epoch``."""
        return self.split.mine(self.split.order(epoch_generator(self.seed, epoch), self.shuffle))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, index) for index in self.indices(epoch).tolist()])

    def __len__(self) -> int:
        return self.split.num_batches * self.split.batch_size if self.split.drop_last else self.split.samples_per_rank


class StreamingBatchLoader:
    """Iterate ``(x, y)`` batches read from image files: x float32 normalized N x C x H x W on ``device``.

    The streaming counterpart of :class:`~mbn.data.loader.TensorBatchLoader`, with the same
    arguments and guarantees (order and augmentation a function of ``(seed, epoch)``; Lightning
    calls :meth:`set_epoch` through :attr:`sampler`; every rank gets the same number of samples).

    Args:
        files: the split to read.
        batch_size: samples per batch (per rank).
        image_size: side of the produced images.
        mean: per-channel mean in [0, 1] pixel units.
        std: per-channel standard deviation in [0, 1] pixel units.
        shuffle: a new order every epoch; otherwise dataset order.
        drop_last: drop the last incomplete batch (every batch has ``batch_size`` samples).
        augment: random-resized crop + flip (training); without it the training images are resized
            to a square as the in-memory path does.
        evaluation: resize + center crop (the evaluation transform; ``augment`` must be False).
        seed: seed of the order and augmentation.
        rank: index of this process among ``world_size``.
        world_size: processes that split the data.
        device: where batches go (and are normalized); pinned host memory when it is a GPU.
        num_workers: decoding processes (persistent across epochs); 0 decodes in this process.
    """

    def __init__(
        self,
        files: ImageFiles,
        batch_size: int,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        drop_last: bool,
        augment: bool,
        evaluation: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        num_workers: int = 4,
    ) -> None:
        if len(files) == 0:
            raise ValueError("cannot build a StreamingBatchLoader over an empty split")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size and num_workers >= 0, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}, num_workers={num_workers}")
        if augment and evaluation:
            raise ValueError("augment and evaluation exclude each other")
        if len(mean) != CHANNELS or len(std) != CHANNELS or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need {CHANNELS} values, std positive; got {tuple(mean)} and {tuple(std)}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._split = EpochSplit(len(files), batch_size, rank, world_size, drop_last)
        self._sampler = _EpochSampler(self._split, seed, shuffle)
        mode = "augment" if augment else "eval" if evaluation else "square"
        self._loader = DataLoader(
            _SeededImages(files.samples, image_size, mode, seed),
            batch_size=batch_size,
            sampler=self._sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=_one_thread,
        )
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # The in-memory loader's normalization, op for op: both paths give the same floats.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    @property
    def sampler(self) -> _EpochSampler:
        """The epoch sampler, where Lightning's ``_set_sampler_epoch`` looks for :meth:`set_epoch`."""
        return self._sampler

    batch_sampler = None  # Lightning inspects it next to ``sampler``; there is none.

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self._sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self._split.num_batches

    def close(self) -> None:
        """Stop the worker processes now (they persist across epochs, and hold what the process had
        open when they were forked, such as the run dir's lock). Iterating again restarts them."""
        stop_dataloader_workers(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for pixels, labels in self._loader:
            x = pixels.to(self.device, non_blocking=True).float().mul_(self._scale).add_(self._shift)
            yield x, labels.to(self.device, non_blocking=True)
