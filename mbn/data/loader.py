"""A data loader over in-memory uint8 images: batched shuffle, random-crop + flip and normalization.

At batch size 2 a training step takes milliseconds, so a per-sample Python pipeline (Dataset +
DataLoader + PIL transforms) would dominate it. This loader processes a chunk of ~1024 samples with a
handful of tensor ops and yields views into it, so per-batch cost is a slice.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from mbn.data.arrays import ImageArrays
from mbn.data.epoch_split import EpochSplit, epoch_generator


class TensorBatchLoader:
    """Iterate ``(x, y)`` batches: x float32 normalized N x C x H x W, y int64 labels.

    Shuffle order and augmentation are a deterministic function of ``(seed, epoch)``, drawn for the
    whole dataset before it is split between ranks, so resuming at an epoch boundary (after
    :meth:`set_epoch`) reproduces an uninterrupted run exactly, and the union of all ranks' samples
    is the same for any ``world_size``. Lightning calls :meth:`set_epoch` at every epoch start through
    the :attr:`sampler` attribute.

    With ``world_size > 1`` every rank gets the same number of samples, as with
    ``DistributedSampler``: the epoch's order is cut to a multiple of ``world_size`` when
    ``drop_last``, else padded by repeating its first samples.

    Args:
        arrays: the split to iterate.
        batch_size: samples per batch (per rank).
        mean: per-channel mean in [0, 1] pixel units (e.g. ``DatasetSplits.mean``).
        std: per-channel standard deviation in [0, 1] pixel units.
        shuffle: draw a new sample order every epoch; otherwise keep dataset order.
        drop_last: drop the last incomplete batch, so every batch has exactly ``batch_size`` samples.
        augment: random crop (after ``crop_padding`` zero padding) and horizontal flip with probability 1/2.
        seed: seed of the order and augmentation.
        rank: index of this process among ``world_size``.
        world_size: number of processes that split the data.
        crop_padding: zero padding on each side before the random crop (only with ``augment``).
        device: where images are kept and batches are produced (``"cuda"`` keeps the data on the GPU).
        chunk_size: samples processed per tensor pass (rounded to a multiple of ``batch_size``).
    """

    def __init__(
        self,
        arrays: ImageArrays,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        drop_last: bool,
        augment: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        crop_padding: int = 4,
        device: str | torch.device = "cpu",
        chunk_size: int = 1024,
    ) -> None:
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("world_size", world_size, minimum=1)
        _check_int("crop_padding", crop_padding, minimum=0)
        _check_int("chunk_size", chunk_size, minimum=1)
        _check_int("seed", seed)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        num_total = len(arrays)
        if num_total == 0:
            raise ValueError("cannot build a TensorBatchLoader over an empty dataset")
        channels = arrays.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")

        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.crop_padding = crop_padding
        self.device = torch.device(device)
        self.epoch = 0

        self._split = EpochSplit(num_total, batch_size, rank, world_size, drop_last)
        self.samples_per_rank = self._split.samples_per_rank
        self.num_batches = self._split.num_batches
        self._chunk = max(batch_size, chunk_size // batch_size * batch_size)

        self._labels = arrays.labels.to(self.device)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        _, _, height, width = arrays.images.shape
        if augment:
            # Pad the whole split once. Every crop is then a window of the padded tensor starting at
            # flat element ``sample * C*Hp*Wp + dy * Wp + dx``; `_windows` views all such windows (they
            # overlap) as rows of one strided tensor, so one index_select gathers every crop of a chunk.
            p = crop_padding
            padded_h, padded_w = height + 2 * p, width + 2 * p
            padded = torch.zeros(num_total, channels, padded_h, padded_w, dtype=torch.uint8, device=self.device)
            padded[:, :, p : p + height, p : p + width] = arrays.images.to(self.device)
            self._images = padded
            self._sample_stride = channels * padded_h * padded_w
            window_extent = (channels - 1) * padded_h * padded_w + (height - 1) * padded_w + width
            self._windows = padded.as_strided(
                (num_total * self._sample_stride - window_extent + 1, channels, height, width),
                (1, padded_h * padded_w, padded_w, 1),
            )
            self._padded_width = padded_w
        else:
            self._images = arrays.images.to(self.device)

    @property
    def sampler(self) -> "TensorBatchLoader":
        """This loader, so Lightning's ``_set_sampler_epoch`` finds :meth:`set_epoch` where it looks."""
        return self

    batch_sampler = None  # Lightning inspects it next to ``sampler``; there is none.

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        _check_int("epoch", epoch, minimum=0)
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's sample indices, crop offsets (dy, dx) and flip flags for ``epoch``, on the CPU.

        Offsets are in padded pixels (``0..2 * crop_padding``); without ``augment`` they are
        ``crop_padding`` (the centered, unshifted image) and flips are False.
        """
        generator = epoch_generator(self.seed, epoch)
        order = self._split.order(generator, self.shuffle)
        total = self._split.total
        if self.augment:
            span = 2 * self.crop_padding + 1
            dy = torch.randint(span, (total,), generator=generator)
            dx = torch.randint(span, (total,), generator=generator)
            flip = torch.randint(2, (total,), generator=generator).bool()
        else:
            dy = dx = torch.full((total,), self.crop_padding)
            flip = torch.zeros(total, dtype=torch.bool)
        return self._split.mine(order), self._split.mine(dy), self._split.mine(dx), self._split.mine(flip)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, dy, dx, flip = (t.to(self.device) for t in self.epoch_plan(self.epoch))
        for start in range(0, len(indices), self._chunk):
            stop = start + self._chunk
            x = self._make_inputs(indices[start:stop], dy[start:stop], dx[start:stop], flip[start:stop])
            y = self._labels[indices[start:stop]]
            yield from zip(x.split(self.batch_size), y.split(self.batch_size))

    def _make_inputs(
        self, indices: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        if self.augment:
            window_starts = indices * self._sample_stride + dy * self._padded_width + dx
            pixels = self._windows.index_select(0, window_starts)
            flipped = flip.nonzero().squeeze(1)
            if flipped.numel():
                pixels.index_copy_(0, flipped, pixels.index_select(0, flipped).flip(3))
        else:
            pixels = self._images[indices]
        return pixels.float().mul_(self._scale).add_(self._shift)


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
