"""Which samples each rank sees in an epoch, in which order: one definition for every loader.

An epoch's order is a function of ``(seed, epoch)`` only, drawn for the whole dataset before it is
split between ranks (as ``DistributedSampler`` does), so resuming at an epoch boundary reproduces an
uninterrupted run, and the in-memory and the streaming loader give the same samples in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, sample index, ...).

    SeedSequence hashes them, so nearby tuples give unrelated streams (``seed + epoch`` would collide).
    """
    return int(np.random.SeedSequence([v % 2**63 for v in values]).generate_state(1, np.uint64)[0] % 2**63)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's order (and, for the in-memory loader, its augmentation)."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch))


@dataclass(frozen=True)
class EpochSplit:
    """How one epoch of ``num_samples`` is split between ``world_size`` ranks and into batches.

    Every rank gets the same number of samples: the epoch's order is cut to a multiple of
    ``world_size`` when ``drop_last``, else padded by repeating its first samples; with
    ``drop_last`` a rank also drops its last incomplete batch.

    Args:
        num_samples: samples in the dataset (>= 1).
        batch_size: samples per batch and rank.
        rank: this process's index among ``world_size``.
        world_size: processes that split the data.
        drop_last: cut to whole batches (training) instead of padding (evaluation).

    Raises:
        ValueError: ``drop_last`` and not one batch fits a rank's share.
    """

    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    drop_last: bool

    def __post_init__(self) -> None:
        if self.drop_last and self.num_batches == 0:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {self.samples_per_rank} samples per rank "
                f"({self.num_samples} samples, world_size={self.world_size}) with drop_last=True: no batch fits"
            )

    @property
    def samples_per_rank(self) -> int:
        """Samples in each rank's share (before a partial last batch is dropped)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def num_batches(self) -> int:
        """Batches per rank and epoch."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    @property
    def total(self) -> int:
        """Length of the epoch's order over all ranks (cut or padded to a multiple of ``world_size``)."""
        return self.samples_per_rank * self.world_size

    def order(self, generator: torch.Generator, shuffle: bool) -> torch.Tensor:
        """The epoch's sample indices over all ranks: a permutation drawn from ``generator`` (or
        dataset order), cut or padded to :attr:`total`.

        Args:
            generator: :func:`epoch_generator` of the epoch.
            shuffle: draw a permutation; otherwise keep dataset order.
        """
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if self.total > n:
            order = torch.cat([order, order[: self.total - n]])
        return order[: self.total]

    def mine(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's part of a per-position tensor of length :attr:`total` (every ``world_size``-th)."""
        used = self.num_batches * self.batch_size if self.drop_last else self.samples_per_rank
        return values[self.rank :: self.world_size][:used]
