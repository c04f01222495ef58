"""Latent shards for training: clean latents (CausVid, diffusion, GAN), first frames (I2V), ODE pairs (ODE init).

The shards are webdataset tar files with an ``index.json`` (format: :mod:`sfplus.datamodules.shard_format`). This
module reads them as a *map-style* dataset: the index gives every member's byte range, so sample ``i`` is one
``seek`` + ``read`` (not ``webdataset.WebDataset``, which streams each tar from its start and cannot fetch sample
``i``; :mod:`~sfplus.datamodules.shard_format` says why that matters). That buys the properties a many-node run
needs with the samplers every other datamodule uses:

* **explicit split** — the lead's :class:`EpochBatchSampler` gives rank ``r`` of ``W`` every ``W``-th sample of a
  per-epoch permutation (node split); the DataLoader hands whole batches to its workers (worker split); each
  worker opens its own file handles;
* **equal batch counts** on all ranks (the permutation wraps around to fill the last step);
* **order a function of (seed, rank, epoch)** and exact mid-epoch resume (``skip_batches``);
* **corrupt samples are skipped and counted** — a damaged member (bad tar header, short read, CRC mismatch,
  undecodable tensor) is replaced by another sample chosen deterministically from ``(seed, index, attempt)``,
  a warning names the shard and key, and the batch carries the count (``datamodule.corrupt_samples`` sums it).

Batches (dict): ``prompts`` list[str]; ``latents`` [B, C, F, H, W]; ``first_frame`` [B, 3, H_px, W_px] in [-1, 1];
``ode_latents`` [B, K, C, F, H, W] and ``ode_timesteps`` [B, K] (0..1000 scale); ``index`` [B] long (the sample
actually read); ``keys`` list[str]. Only the entries the shards hold (or ``fields`` asks for) are present.
"""

from __future__ import annotations

import logging
import os
import random
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sfplus.datamodules.samplers import EpochBatchSampler, WorkerStart, worker_context
from sfplus.datamodules.shard_format import (
    EXT_FIRST_FRAME,
    EXT_LATENT,
    EXT_ODE,
    CorruptSampleError,
    ShardFormatError,
    ShardReader,
    load_index,
)
from sfplus.layout import data_rank_and_world, get_layout

log = logging.getLogger("sfplus.datamodules.shards")

# batch field -> tar member suffix
FIELDS = {"latents": EXT_LATENT, "first_frame": EXT_FIRST_FRAME, "ode_latents": EXT_ODE}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LatentShardDataset(Dataset):
    """Indexed samples of one or more shard folders, with deterministic replacement of corrupt samples.

    Args:
        paths: shard folders (each with ``index.json``) or index files; concatenated in the given order.
        fields: batch entries to load among ``latents``, ``first_frame``, ``ode_latents`` (default: all the
            shards hold). Asking for one the shards lack is a ShardFormatError at construction.
        dtype: dtype of returned latents / ODE trajectories.
        seed: seeds the choice of replacement samples.
        max_attempts: replacements tried for one item before giving up (then ShardFormatError: the data is
            mostly broken, not occasionally).

    Item: ``{"prompts": str, "latents": [C, F, H, W], "first_frame": [3, H, W] in [-1, 1], "ode_latents":
    [K, C, F, H, W], "ode_timesteps": [K], "index": int, "key": str, "corrupt": int}``.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        fields: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        max_attempts: int = 16,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise ShardFormatError("no shard folders given")
        self.readers: list[ShardReader] = []
        self.shard_ids: list[tuple[int, int]] = []  # (reader, shard) of every shard, in order
        self.starts: list[int] = []  # global index of each shard's first sample
        total = 0
        summary: dict | None = None
        for p in paths:
            root, index = load_index(p)
            self._check_files(root, index)
            s = {k: index.get(k) for k in ("fields", "latent_shape", "first_frame_shape", "ode_shape", "ode_timesteps")}
            if summary is None:
                summary, self.summary_source = s, root
            elif s != summary:
                raise ShardFormatError(
                    f"shard folders {self.summary_source} and {root} hold different fields/shapes ({summary} vs {s}): "
                    f"they cannot be batched together"
                )
            r = len(self.readers)
            reader = ShardReader(root, index)
            del index  # the reader holds a compact copy; the JSON dicts would cost ~1 kB per sample
            self.readers.append(reader)
            for j in range(len(reader.files)):
                if reader.num_samples(j):
                    self.shard_ids.append((r, j))
                    self.starts.append(total)
                    total += reader.num_samples(j)
        self.total = total
        if not total:
            raise ShardFormatError(f"shard folders {[str(p) for p in paths]} hold no samples")
        assert summary is not None
        self.summary = summary
        present = [name for name, ext in FIELDS.items() if ext in (summary["fields"] or [])]
        if fields is None:
            fields = present
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise ShardFormatError(f"unknown field(s) {unknown}; choose among {list(FIELDS)}")
        missing = [f for f in fields if f not in present]
        if missing:
            raise ShardFormatError(
                f"shards in {self.summary_source} lack {missing} (they hold {present}); "
                f"first frames come from `tools/encode_latents.py`, ODE trajectories from `tools/generate_ode_pairs.py`"
            )
        self.fields = list(fields)
        self.exts = [FIELDS[f] for f in self.fields]
        self.dtype, self.seed, self.max_attempts = dtype, seed, max_attempts
        self.corrupt = 0  # in this process (workers have their own; batches carry the per-batch count)
        self._bad: set[int] = set()

    @staticmethod
    def _check_files(root: Path, index: dict) -> None:
        for s in index["shards"]:
            path = root / s["file"]
            if not path.is_file():
                raise ShardFormatError(f"{root / 'index.json'} lists {s['file']}, which does not exist")
            if "bytes" in s and path.stat().st_size != s["bytes"]:
                # Not fatal: the damaged samples are found (and replaced) when read.
                log.warning("%s has %d bytes, the index says %d: damaged or rewritten shard",
                            path, path.stat().st_size, s["bytes"])

    def __len__(self) -> int:
        return self.total

    def location(self, i: int) -> tuple[int, int, int]:
        """(reader, shard, row) of global sample ``i``."""
        if not 0 <= i < self.total:
            raise IndexError(f"sample index {i} out of range [0, {self.total})")
        k = bisect_right(self.starts, i) - 1
        r, shard = self.shard_ids[k]
        return r, shard, i - self.starts[k]

    @property
    def ode_timesteps(self) -> list[float] | None:
        return self.summary.get("ode_timesteps")

    def _replacement(self, i: int, attempt: int) -> int:
        return random.Random(f"{self.seed}:{i}:{attempt}").randrange(self.total)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, corrupt = i, 0
        for attempt in range(1, self.max_attempts + 1):
            if j not in self._bad:
                r, shard, row = self.location(j)
                try:
                    sample = self.readers[r].read(shard, row, self.exts)
                    return self._item(sample, j, corrupt)
                except CorruptSampleError as err:
                    self._bad.add(j)
                    self.corrupt += 1
                    log.warning("skipping corrupt sample %d: %s", j, err)
            corrupt += 1
            j = self._replacement(i, attempt)
        raise ShardFormatError(f"sample {i} and {self.max_attempts - 1} replacements are all unreadable: see warnings")

    def _item(self, sample, j: int, corrupt: int) -> dict[str, Any]:
        item: dict[str, Any] = {"prompts": sample.prompt, "index": j, "key": sample.key, "corrupt": corrupt}
        if "latents" in self.fields:
            item["latents"] = sample.latent.to(self.dtype)
        if "first_frame" in self.fields:
            item["first_frame"] = sample.first_frame.float() / 127.5 - 1.0
        if "ode_latents" in self.fields:
            item["ode_latents"] = sample.ode.to(self.dtype)
            item["ode_timesteps"] = sample.ode_timesteps.float()
        return item

    def locate(self, i: int) -> tuple[Path, str]:
        """(shard file, key) of sample ``i`` (for messages and tests)."""
        r, shard, row = self.location(i)
        return self.readers[r].path(shard), self.readers[r].keys[shard][row]


def collate_shards(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch; mismatched tensor shapes are a ShardFormatError naming two keys."""
    out: dict[str, Any] = {
        "prompts": [it["prompts"] for it in items],
        "keys": [it["key"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "corrupt_samples": sum(it["corrupt"] for it in items),
    }
    for name in ("latents", "first_frame", "ode_latents", "ode_timesteps"):
        if name in items[0]:
            shapes = {tuple(it[name].shape) for it in items}
            if len(shapes) > 1:
                a, b = items[0], next(it for it in items if it[name].shape != items[0][name].shape)
                raise ShardFormatError(
                    f"{name} of samples {a['key']!r} {tuple(a[name].shape)} and {b['key']!r} {tuple(b[name].shape)} "
                    f"differ: a shard set must hold one size"
                )
            out[name] = torch.stack([it[name] for it in items])
    return out


class LatentShardDataModule(L.LightningDataModule):
    """Latent shards for the recipes that need data: CausVid / diffusion / GAN (clean latents), I2V (first
    frames), ODE initialisation (ODE trajectories).

    Args:
        path: a shard folder (with ``index.json``), or a list of them (concatenated; same fields and shapes).
        batch_size: samples per batch on each rank.
        seed: order of the batches (a function of seed, rank and epoch) and of corrupt-sample replacements.
        batches_per_epoch: batches per epoch on each rank (default: one pass over the data).
        fields: entries to load among ``latents``, ``first_frame``, ``ode_latents`` (default: all present).
            ODE training can skip ``latents`` (the trajectory's last entry is the clean latent).
        dtype: dtype of latents and trajectories in the batch (``float32``, ``bfloat16``, ``float16``).
        num_workers: DataLoader worker processes per rank (each reads whole batches).
        worker_start_method: how workers start: ``forkserver`` (default; a fork of the training process can
            deadlock on its communication threads' locks), ``spawn`` or ``fork``.
        pin_memory: pin batches for faster host-to-GPU copies.
        rank, world_size: explicit split; default: the trainer's (or torch.distributed's) rank and world size.
    """

    def __init__(
        self,
        path: str | list[str],
        batch_size: int = 1,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        fields: list[str] | None = None,
        dtype: str = "float32",
        num_workers: int = 2,
        pin_memory: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        worker_start_method: WorkerStart = "forkserver",
    ) -> None:
        super().__init__()
        self.worker_context = worker_context(num_workers, worker_start_method)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.path, self.batch_size, self.seed = path, batch_size, seed
        self.batches_per_epoch, self.fields, self.dtype = batches_per_epoch, fields, _DTYPES[dtype]
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._rank, self._world = rank, world_size
        self.dataset: LatentShardDataset | None = None
        self.corrupt_samples = 0  # replaced samples seen in this rank's batches (saved in checkpoints)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            paths = [self.path] if isinstance(self.path, (str, os.PathLike)) else list(self.path)
            self.dataset = LatentShardDataset(paths, self.fields, self.dtype, self.seed)

    @property
    def ode_timesteps(self) -> list[float] | None:
        """Timesteps (0..1000) of the stored ODE snapshots, noisiest first; None without ODE data."""
        self.setup()
        return self.dataset.ode_timesteps  # type: ignore[union-attr]

    def _split(self) -> tuple[int | None, int | None]:
        if self._rank is not None:
            return self._rank, self._world
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return data_rank_and_world() if get_layout() is not None else (trainer.global_rank, trainer.world_size)
        return None, None  # the sampler asks torch.distributed when it iterates

    def batch_sampler(self) -> EpochBatchSampler:
        self.setup()
        rank, world = self._split()
        assert self.dataset is not None
        return EpochBatchSampler(
            len(self.dataset), self.batch_size, seed=self.seed, batches_per_epoch=self.batches_per_epoch,
            rank=rank, world_size=world,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_sampler=self.batch_sampler(),
            collate_fn=collate_shards,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=self.worker_context,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "corrupt_samples" in batch:
            self.corrupt_samples += int(batch.pop("corrupt_samples"))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"corrupt_samples": self.corrupt_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.corrupt_samples = int(state_dict.get("corrupt_samples", 0))


__all__ = ["FIELDS", "LatentShardDataModule", "LatentShardDataset", "collate_shards"]
