"""Batch samplers that split data across ranks explicitly and resume mid-epoch.

Lightning replays an epoch from its start when a run resumes mid-epoch (it does not restore a sampler's position);
these samplers instead skip the batches the checkpoint says were consumed, so a resumed run sees exactly the batches an
uninterrupted run would have seen. Every rank yields the same number of batches (no hang, no dropped tail:
the global order is padded by wrapping around).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.data import Sampler

from sfplus.layout import data_rank_and_world


class EpochBatchSampler(Sampler[list[int]]):
    """Training batches from an endless, seeded stream of the dataset's indices, cut into epochs.

    The stream concatenates permutations of ``range(length)``; pass ``p`` is a function of ``(seed, p)`` only.
    Global batch ``k`` is rows ``[k*W*B, (k+1)*W*B)`` of the stream, and rank ``r`` of ``W`` takes rows
    ``[r*B, (r+1)*B)`` of it — the rows whose noise streams it draws (``sfplus.noise``), so ``W`` ranks reproduce
    one process with a ``W``-times larger batch.

    Which batch comes next is ``position`` (a global batch index), not Lightning's epoch bookkeeping: the
    training modules set it from their own count of consumed batches at the start of training and of every
    epoch, which makes resume exact wherever the checkpoint was taken. Each ``__iter__`` yields from
    ``position`` up to the end of its epoch (``len(self)`` batches per epoch).

    Args:
        length: number of samples in the dataset.
        batch_size: samples per batch on each rank.
        seed: base seed of the order.
        shuffle: permute (True) or keep dataset order.
        batches_per_epoch: batches each rank yields per epoch (default: one pass over the data).
        rank, world_size: explicit split (default at iteration time: the data-parallel rank and size,
            :func:`sfplus.layout.data_rank_and_world`).
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
        self.position = 0
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _split(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return data_rank_and_world()  # data-parallel ranks: a sequence-parallel group shares its samples

    def __len__(self) -> int:
        if self._batches_per_epoch is not None:
            return self._batches_per_epoch
        _, world = self._split()
        return max(1, math.ceil(self.length / (world * self.batch_size)))

    @property
    def epoch(self) -> int:
        return self.position // len(self)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the first batch of ``epoch``."""
        self.position = epoch * len(self)

    @property
    def skip_batches(self) -> int:
        return self.position % len(self)

    @skip_batches.setter
    def skip_batches(self, n: int) -> None:
        """Start the next iteration ``n`` batches into the current epoch."""
        self.position = self.epoch * len(self) + n

    def _permutation(self, pass_index: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        if pass_index not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
            self._perm_cache[pass_index] = torch.randperm(self.length, generator=g)
        return self._perm_cache[pass_index]

    def rows(self, start: int, stop: int) -> list[int]:
        """Dataset indices at stream rows ``[start, stop)``."""
        out = []
        row = start
        while row < stop:
            p, offset = divmod(row, self.length)
            take = min(stop - row, self.length - offset)
            out.extend(self._permutation(p)[offset : offset + take].tolist())
            row += take
        return out

    def batch(self, k: int) -> list[int]:
        """This rank's part of global batch ``k``."""
        rank, world = self._split()
        first = (k * world + rank) * self.batch_size
        return self.rows(first, first + self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self)
        start = self.position
        end = (start // n + 1) * n
        for k in range(start, end):
            self.position = k + 1
            yield self.batch(k)


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
        return data_rank_and_world()  # data-parallel ranks: a sequence-parallel group shares its samples

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


#: How DataLoader workers start (``worker_start_method`` of the data modules; see :func:`worker_context`).
WorkerStart = Literal["forkserver", "spawn", "fork"]


def worker_context(num_workers: int, start_method: WorkerStart = "forkserver") -> str | None:
    """The ``multiprocessing_context`` for a DataLoader with ``num_workers`` workers.

    ``forkserver`` by default: forking a training process copies it mid-flight, threads and all (gloo / NCCL
    progress threads, the TensorBoard writer, BLAS pools), and a child can deadlock inside ``fork`` on a lock one of
    those threads held — seen here as a 2-rank gloo run whose worker never started, its peer waiting in an
    all-gather forever. A fork server is a fresh single-threaded process that forks the workers instead (each
    starts in about a second; the dataset is pickled to it). None without workers.
    """
    if num_workers <= 0:
        return None
    if start_method not in ("forkserver", "spawn", "fork"):
        raise ValueError(f"worker_start_method must be forkserver, spawn or fork, got {start_method!r}")
    return start_method
