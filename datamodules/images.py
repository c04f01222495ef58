"""Image + prompt pairs for image-to-video: batch generation (``predict``) and data-free I2V distillation (``fit``).

Sources (``path``):

* a folder of images (``.png .jpg .jpeg .webp .bmp``), each with a same-stem ``.txt`` prompt next to it
  (``cat.png`` + ``cat.txt``), in natural name order;
* a ``.json`` file holding a list of ``{"image": path, "prompt": str}`` objects, or a ``.jsonl`` file with one such
  object per line; relative image paths are resolved against the file's folder.

Each image is read as RGB in [-1, 1] and resized the way Wan does (:func:`sfplus.conditioning.i2v.wan_i2v_size`:
aspect ratio
kept, pixel budget ``max_area``, sizes a multiple of VAE stride × patch), or — with ``size: [H, W]`` — resized to
cover that size and centre-cropped to it (one size for every image, so batches of several images and training
at a fixed latent shape work).

Items: ``{"prompts", "text", "index", "sample", "image" [3, H, W] in [-1, 1], "image_path"}``; batches stack
``image`` to [B, 3, H, W].
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sfplus.conditioning.i2v import check_image, load_image, resize_image, wan_i2v_size
from sfplus.datamodules.prompts import PromptSourceError, read_text_file
from sfplus.datamodules.samplers import EpochBatchSampler, EvenSplitSampler, WorkerStart, worker_context

__all__ = ["IMAGE_SUFFIXES", "ImagePair", "ImagePromptDataModule", "ImagePromptDataset", "collate_images",
           "read_image_pairs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImagePair:
    image: Path
    prompt: str


def _natural_key(name: str) -> list:
    return [int(s) if s.isdecimal() else s for s in re.split(r"(\d+)", name)]


def _pairs_from_folder(folder: Path) -> list[ImagePair]:
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: _natural_key(p.name))
    if not images:
        raise PromptSourceError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs, missing = [], []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            missing.append(txt.name)
            continue
        prompt = read_text_file(txt).strip()
        if not prompt:
            raise PromptSourceError(f"prompt file {txt} is empty")
        pairs.append(ImagePair(img, prompt))
    if missing:
        raise PromptSourceError(f"{len(missing)} image(s) in {folder} have no same-stem .txt prompt: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return pairs


def _pair_from_entry(entry, where: str, base: Path) -> ImagePair:
    fields_ok = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("image", "prompt"))
    if not fields_ok:
        raise PromptSourceError(
            f"{where}: expected an object with string fields 'image' and 'prompt', got {entry!r:.200}")
    prompt = entry["prompt"].strip()
    if not prompt:
        raise PromptSourceError(f"{where}: empty prompt")
    image = Path(entry["image"]).expanduser()
    return ImagePair(image if image.is_absolute() else base / image, prompt)


def _pairs_from_json(path: Path) -> list[ImagePair]:
    text = read_text_file(path)
    base = path.parent
    if path.suffix.lower() == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise PromptSourceError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptSourceError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise PromptSourceError(f"{path}: expected a JSON list of {{\"image\", \"prompt\"}} objects, "
                                    f"got {type(data).__name__}")
        entries = [(f"{path} item {i}", e) for i, e in enumerate(data)]
    if not entries:
        raise PromptSourceError(f"{path} lists no images")
    return [_pair_from_entry(e, where, base) for where, e in entries]


def read_image_pairs(path: str | os.PathLike) -> list[ImagePair]:
    """(image, prompt) pairs of a folder or a ``.json``/``.jsonl`` list; every image file must exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PromptSourceError(f"image source {p} does not exist")
    if p.is_dir():
        pairs = _pairs_from_folder(p)
    elif p.suffix.lower() in (".json", ".jsonl"):
        pairs = _pairs_from_json(p)
    else:
        raise PromptSourceError(f"image source {p} must be a folder of images + .txt prompts or a .json/.jsonl list")
    absent = [str(pair.image) for pair in pairs if not pair.image.is_file()]
    if absent:
        raise PromptSourceError(f"{len(absent)} image(s) listed in {p} do not exist: "
                                f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    return pairs


def _cover_crop(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize [3, h, w] to cover (height, width) with the aspect ratio kept, then centre-crop to it."""

    h, w = img.shape[-2:]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    out = resize_image(img, rh, rw) if (rh, rw) != (h, w) else img
    top, left = (rh - height) // 2, (rw - width) // 2
    return out[:, top : top + height, left : left + width]


class ImagePromptDataset(Dataset):
    """``num_samples`` items per (image, prompt) pair; item ``-1`` is a padding item (never written).

    Args:
        pairs: the (image, prompt) pairs.
        num_samples: videos per pair.
        max_area, rounding, spatial_stride, patch: Wan's size rule (:func:`sfplus.conditioning.i2v.wan_i2v_size`).
        size: fixed (H, W) instead (cover + centre crop).
    """

    def __init__(self, pairs: list[ImagePair], num_samples: int = 1, *, max_area: int = 480 * 832,
                 size: tuple[int, int] | None = None, rounding: str = "nearest", spatial_stride: int = 8,
                 patch: int = 2) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if size is not None:
            step = spatial_stride * patch
            if len(size) != 2 or any(s <= 0 or s % step for s in size):
                raise ValueError(f"size must be [H, W], positive multiples of {step} (VAE stride × patch), got {size}")
        self.pairs, self.num_samples = pairs, num_samples
        self.max_area, self.size, self.rounding = max_area, tuple(size) if size else None, rounding
        self.spatial_stride, self.patch = spatial_stride, patch

    def __len__(self) -> int:
        return len(self.pairs) * self.num_samples

    def image(self, p: int) -> torch.Tensor:
        """Pair ``p``'s image, [3, H, W] in [-1, 1] at its generation size (ImageReadError names a bad file)."""

        img = load_image(self.pairs[p].image)
        if self.size is not None:
            return _cover_crop(img, *self.size)
        h, w = wan_i2v_size(img.shape[1], img.shape[2], self.max_area, self.spatial_stride, self.patch,
                            rounding=self.rounding)
        return resize_image(img, h, w) if (h, w) != tuple(img.shape[1:]) else img

    def __getitem__(self, i: int) -> dict:
        p, s = divmod(i, self.num_samples) if i >= 0 else (0, 0)
        pair = self.pairs[p]
        return {"prompts": pair.prompt, "text": pair.prompt, "index": p if i >= 0 else -1, "sample": s,
                "image": self.image(p), "image_path": str(pair.image)}


def collate_images(items: list[dict]) -> dict:
    """Stack items; images of different sizes cannot share a batch (padding items take the batch's size)."""
    real = [it for it in items if it["index"] >= 0] or items
    shape = tuple(real[0]["image"].shape)
    images = []
    for it in items:
        img = it["image"]
        if tuple(img.shape) != shape:
            if it["index"] >= 0:
                raise ValueError(
                    f"images {real[0]['image_path']} {shape[1:]} and {it['image_path']} {tuple(img.shape[1:])} have "
                    f"different generation sizes and cannot share a batch: use batch_size 1, or set size: [H, W]")
            img = _cover_crop(img, *shape[1:])  # a padding item: generated, never written
        images.append(img)
    return {
        "prompts": [it["prompts"] for it in items],
        "text": [it["text"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "sample": torch.tensor([it["sample"] for it in items], dtype=torch.long),
        "image": torch.stack(images),
        "image_path": [it["image_path"] for it in items],
    }


class ImagePromptDataModule(L.LightningDataModule):
    """Images with prompts for image-to-video: generation (``predict``) and data-free I2V distillation (``fit``).

    Args:
        path: a folder of images with same-stem ``.txt`` prompts, or a ``.json``/``.jsonl`` list of
            ``{"image", "prompt"}``.
        batch_size: items per batch on each rank.
        num_samples: videos per image when predicting.
        max_area: pixel budget of Wan's size rule (480·832 for the 480P model, 720·1280 for 720P).
        size: fixed ``[H, W]`` (cover + centre crop) instead of Wan's rule; training needs the generator's size
            (``[480, 832]`` for the 21×60×104 latent shape).
        rounding: ``nearest`` (a 480×832 image stays 480×832) or ``wan`` (official Wan's float floor, which sends
            it to 464×832); see :func:`sfplus.conditioning.i2v.wan_i2v_size`.
        spatial_stride, patch: VAE stride and DiT patch (8 and 2 for Wan2.1).
        seed: order of training batches.
        batches_per_epoch: training batches per epoch on each rank (default: one pass).
        num_workers: DataLoader workers (image decoding and resizing run there).
        worker_start_method: how workers start: ``forkserver`` (default; a fork of the training process can
            deadlock on its communication threads' locks), ``spawn`` or ``fork``.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 1,
        num_samples: int = 1,
        max_area: int = 480 * 832,
        size: list[int] | None = None,
        rounding: str = "nearest",
        spatial_stride: int = 8,
        patch: int = 2,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        num_workers: int = 0,
        worker_start_method: WorkerStart = "forkserver",
    ) -> None:
        super().__init__()
        self.worker_context = worker_context(num_workers, worker_start_method)
        if rounding not in ("nearest", "wan"):
            raise ValueError(f"rounding must be 'nearest' or 'wan', got {rounding!r}")
        self.path, self.batch_size, self.num_samples = path, batch_size, num_samples
        self.max_area, self.size, self.rounding = max_area, size, rounding
        self.spatial_stride, self.patch = spatial_stride, patch
        self.seed, self.batches_per_epoch, self.num_workers = seed, batches_per_epoch, num_workers
        self._pairs: list[ImagePair] | None = None

    def pairs(self) -> list[ImagePair]:
        if self._pairs is None:
            self._pairs = read_image_pairs(self.path)
        return self._pairs

    def setup(self, stage: str | None = None) -> None:
        # At the door: a damaged image stops the run now with its name, not mid-epoch inside a worker.
        for pair in self.pairs():
            check_image(pair.image)

    def dataset(self, num_samples: int) -> ImagePromptDataset:
        return ImagePromptDataset(self.pairs(), num_samples, max_area=self.max_area, size=self.size,
                                  rounding=self.rounding, spatial_stride=self.spatial_stride, patch=self.patch)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(1)
        sampler = EpochBatchSampler(len(ds), self.batch_size, seed=self.seed, batches_per_epoch=self.batches_per_epoch)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_images, num_workers=self.num_workers,
                          multiprocessing_context=self.worker_context)

    def predict_dataloader(self) -> DataLoader:
        ds = self.dataset(self.num_samples)
        return DataLoader(ds, batch_sampler=EvenSplitSampler(len(ds), self.batch_size), collate_fn=collate_images,
                          num_workers=self.num_workers, multiprocessing_context=self.worker_context)
