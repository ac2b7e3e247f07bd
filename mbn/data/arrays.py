"""In-memory image datasets: uint8 tensors plus labels, class names and per-channel statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageArrays:
    """One split of an image classification dataset, fully in memory.

    Args:
        images: uint8 tensor, N x C x H x W, contiguous.
        labels: int64 tensor, N, values in ``[0, len(classes))``.
        classes: class names; index = label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "images must be a uint8 N x C x H x W tensor, "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be an int64 tensor of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int, seed: int) -> "ImageArrays":
        """Pick ``n`` samples, stratified by class, deterministically for a given ``seed``.

        Every class gets a share proportional to its size (balanced data: counts differ by at most one).
        The picked samples keep their original order.

        Args:
            n: number of samples, ``1 <= n <= len(self)``.
            seed: selects which samples of each class are taken.
        """
        return self.take(stratified_subset(self.labels, len(self.classes), n, seed))

    def take(self, indices: torch.Tensor) -> "ImageArrays":
        """The samples at ``indices`` (int64), in that order.

        Args:
            indices: sample indices.
        """
        return ImageArrays(self.images[indices], self.labels[indices], self.classes)


def stratified_subset(labels: torch.Tensor, num_classes: int, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` samples, stratified by class, deterministic for ``seed``, in ascending order.

    Every class gets a share proportional to its size (balanced data: counts differ by at most one).
    Depends on the labels only, so the in-memory and the streaming data paths pick the same samples.

    Args:
        labels: int64 class index of every sample.
        num_classes: number of classes.
        n: number of samples, ``1 <= n <= len(labels)``.
        seed: selects which samples of each class are taken.
    """
    total = len(labels)
    if not 1 <= n <= total:
        raise ValueError(f"subset size n must be in [1, {total}], got {n}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)
    shuffled_labels = labels[order]
    # Rank of each sample within its class, in shuffled order; sorting by rank / class size
    # interleaves classes proportionally, so any prefix of the result is stratified.
    class_sorted = torch.sort(shuffled_labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(total, dtype=torch.int64)
    rank[class_sorted.indices] = torch.arange(total) - starts[class_sorted.values]
    position = (rank.double() + 0.5) / counts[shuffled_labels].double()
    picked = order[torch.sort(position, stable=True).indices[:n]]
    return torch.sort(picked).values


def stratified_holdout(labels: torch.Tensor, num_classes: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the samples into ``n`` held out (:func:`stratified_subset`) and the rest, both in ascending order.

    Args:
        labels: int64 class index of every sample.
        num_classes: number of classes.
        n: samples held out, ``1 <= n < len(labels)`` (the rest keeps at least one).
        seed: selects which samples of each class are held out.

    Returns:
        ``(held_out, rest)`` index tensors, disjoint, together every sample once.
    """
    total = len(labels)
    if not 1 <= n < total:
        raise ValueError(f"held-out size must be in [1, {total - 1}] (fewer than the {total} samples), got {n}")
    held_out = stratified_subset(labels, num_classes, n, seed)
    keep = torch.ones(total, dtype=torch.bool)
    keep[held_out] = False
    return held_out, keep.nonzero().squeeze(1)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] pixel units.

    Accumulates in float64 over chunks, so large datasets need no float copy of the whole array.

    Args:
        images: uint8 tensor, N x C x H x W.
        chunk: images per accumulation step.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot compute channel statistics of an empty image set")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square_().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


@dataclass
class DatasetSplits:
    """A dataset's train and test splits plus the train split's per-channel statistics.

    Args:
        name: dataset identifier, e.g. ``"cifar10"``.
        train: training split.
        test: evaluation split (CIFAR's test set, ImageNet-style ``val/``).
        mean: per-channel mean of the train images, in [0, 1] pixel units.
        std: per-channel standard deviation of the train images, in [0, 1] pixel units.
    """

    name: str
    train: ImageArrays
    test: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train.images.shape[1:])} "
                f"vs {tuple(self.test.images.shape[1:])}"
            )
        if self.train.classes != self.test.classes:
            raise ValueError("train and test splits must share the same class list")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.train.images.shape[1:]
        return int(channels), int(height), int(width)
