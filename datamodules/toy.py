"""The built-in toy task's data: synthetic moving-shape clips (training) and all toy prompts (prediction).

``latents`` are the clips through the toy codec: the pixels [B, 3, F, H, W] in [-1, 1] (``frames_per_latent: 1``)
or s frames stacked along the channels [B, 3·s, F/s, H, W] (``TimePackCodec``; the demo's teacher uses s = 4).
"""

from __future__ import annotations

import functools

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sfplus.datamodules.prompts import PromptDataset, collate_prompts
from sfplus.datamodules.samplers import EpochBatchSampler, EvenSplitSampler
from sfplus.nets.codec import latent_shape, toy_codec
from sfplus.toy.videos import ToyVideoDataset, ToyVideoSpec, toy_prompts


class _ToyTrainSet(Dataset):
    def __init__(self, videos: ToyVideoDataset) -> None:
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        item = self.videos[i]
        return {"prompts": item["prompt"], "latents": item["video"], "index": item["index"]}


def _collate_train(items: list[dict], codec) -> dict:
    return {
        "prompts": [it["prompts"] for it in items],
        "latents": codec.encode(torch.stack([it["latents"] for it in items])),
        "index": torch.tensor([it["index"] for it in items]),
    }


class ToyDataModule(L.LightningDataModule):
    """Toy clips for training and the toy prompt set for generation.

    Args:
        frames, height, width, colours, shapes, directions, speed, size: the toy videos (``ToyVideoSpec``).
        batch_size: clips (or prompts) per batch on each rank.
        length: number of distinct training clips.
        seed: the clips' seed and the order of training batches.
        batches_per_epoch: training batches per epoch on each rank (default: one pass).
        num_samples: videos per prompt when predicting (every colour/shape/direction combination is a prompt).
        frames_per_latent: the toy codec's packing (``ToyConditioner.frames_per_latent``; must match the model's).
    """

    def __init__(
        self,
        frames: int = 4,
        height: int = 16,
        width: int = 16,
        colours: list[str] | None = None,
        shapes: list[str] | None = None,
        directions: list[str] | None = None,
        speed: int | None = None,
        size: int = 5,
        batch_size: int = 32,
        length: int = 100_000,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        num_samples: int = 1,
        frames_per_latent: int = 1,
    ) -> None:
        super().__init__()

        self.codec = toy_codec(frames_per_latent)
        kwargs = {k: tuple(v) for k, v in (("colours", colours), ("shapes", shapes), ("directions", directions)) if v}
        self.spec = ToyVideoSpec(frames=frames, height=height, width=width, speed=speed, size=size, **kwargs)
        latent_shape(self.codec, frames, height, width)  # clear error for a frame count s does not divide
        self.batch_size, self.length, self.seed = batch_size, length, seed
        self.batches_per_epoch, self.num_samples = batches_per_epoch, num_samples

    def train_dataloader(self) -> DataLoader:
        ds = _ToyTrainSet(ToyVideoDataset(self.length, self.seed, self.spec))
        sampler = EpochBatchSampler(len(ds), self.batch_size, seed=self.seed, batches_per_epoch=self.batches_per_epoch)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=functools.partial(_collate_train, codec=self.codec))

    def predict_dataloader(self) -> DataLoader:
        ds = PromptDataset(toy_prompts(self.spec), self.num_samples)
        return DataLoader(ds, batch_sampler=EvenSplitSampler(len(ds), self.batch_size), collate_fn=collate_prompts)
