"""Batch samplers that split data across ranks explicitly and resume mid-epoch.

Lightning replays an epoch from its start when a run resumes mid-epoch (spec lightning-notes §0); these samplers
instead skip the batches the checkpoint says were consumed, so a resumed run sees exactly the batches an
uninterrupted run would have seen. Every rank yields the same number of batches (no hang, no dropped tail:
the global order is padded by wrapping around).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochBatchSampler(Sampler[list[int]]):
    """Training batches: a permutation of ``range(length)`` per epoch, a function of ``(seed, epoch)`` only.

    Rank ``r`` of ``W`` takes rows ``[r*B, (r+1)*B)`` of each global batch of the (wrapped) permutation.
    ``batches_per_epoch`` may exceed one pass over the data (the order then continues into the
    next permutation), which keeps tiny prompt lists from producing one-batch epochs.

    Args:
        length: number of samples in the dataset.
        batch_size: samples per batch on each rank.
        seed: base seed of the order.
        shuffle: permute (True) or keep dataset order.
        batches_per_epoch: batches each rank yields per epoch (default: one pass over the data).
        rank, world_size: explicit split (default: from ``torch.distributed`` at iteration time).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        batches_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._batches_per_epoch = batches_per_epoch
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skip_batches = 0

    def _split(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return _rank_and_world()

    def __len__(self) -> int:
        if self._batches_per_epoch is not None:
            return self._batches_per_epoch
        _, world = self._split()
        return max(1, math.ceil(self.length / (world * self.batch_size)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, pass_index: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._split()
        n_batches = len(self)
        per_step = world * self.batch_size
        needed = n_batches * per_step
        # Concatenate passes; a pass index depends on (epoch, pass) so each epoch starts a fresh permutation.
        passes_per_epoch = math.ceil(needed / self.length)
        order = torch.cat([self._order(self.epoch * passes_per_epoch + p) for p in range(passes_per_epoch)])
        start, self.skip_batches = self.skip_batches, 0
        for b in range(start, n_batches):
            chunk = order[b * per_step : (b + 1) * per_step]
            # Contiguous rows: rank r holds rows [r*B, (r+1)*B) of the global batch, the rows whose noise
            # streams it draws (sfplus.noise), so N ranks reproduce one process with an N-times larger batch.
            yield chunk[rank * self.batch_size : (rank + 1) * self.batch_size].tolist()


class EvenSplitSampler(Sampler[list[int]]):
    """Prediction batches: every index exactly once across ranks (rank r takes r, r+W, ...).

    Ranks with fewer items get padded batches whose extra entries are ``-1`` (the dataset must map ``-1`` to a
    padding item that is generated but never written), so all ranks run the same number of steps: no hang in
    collectives and no silently dropped prompt.
    """

    def __init__(self, length: int, batch_size: int, *, rank: int | None = None, world_size: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.length, self.batch_size = length, batch_size
        self._rank, self._world = rank, world_size

    def _split(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return _rank_and_world()

    def __len__(self) -> int:
        _, world = self._split()
        per_rank = math.ceil(self.length / world)
        return math.ceil(per_rank / self.batch_size) if per_rank else 0

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._split()
        mine = list(range(rank, self.length, world))
        total = len(self) * self.batch_size
        mine += [-1] * (total - len(mine))
        for b in range(len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]
