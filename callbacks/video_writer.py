"""Prediction writer: one MP4 and one JSON sidecar per generated video, atomic, resumable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from sfplus.video_io import safe_stem, write_json_atomic, write_mp4


class VideoWriter(BasePredictionWriter):
    """Writes ``<output_dir>/<stem>.mp4`` and ``<stem>.json`` for each generated video.

    Outputs that already exist are skipped (the module asks :meth:`exists` before generating), so a preempted
    batch job resumes where it stopped. The sidecar holds the prompt, the seed, the sampler and the checkpoint.

    Args:
        output_dir: where to write; created if missing, must be writable.
        fps: frame rate of the MP4s (Wan: 16).
        upscale: integer nearest-neighbour upscaling (for the tiny toy videos).
        save_latents: also write the latents as ``<stem>.pt``.
    """

    def __init__(self, output_dir: str = "outputs", fps: int = 16, upscale: int = 1, save_latents: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.fps, self.upscale, self.save_latents = Path(output_dir), fps, upscale, save_latents
        self.written = 0
        self._start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create output folder {self.output_dir}: {err.strerror}") from None
        if not os.access(self.output_dir, os.W_OK):
            raise PermissionError(f"output folder {self.output_dir} is not writable")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self._start, self.written = time.perf_counter(), 0

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        took = time.perf_counter() - (self._start or time.perf_counter())
        rate = self.written / took if took > 0 else 0.0
        print(f"[rank {trainer.global_rank}] wrote {self.written} videos to {self.output_dir} in {took:.1f} s "
              f"({rate:.2f} videos/s); existing outputs were skipped", flush=True)

    def stem(self, text: str, index: int, sample: int) -> str:
        return safe_stem(text, index, sample)

    def exists(self, text: str, index: int, sample: int) -> bool:
        stem = self.stem(text, index, sample)
        return (self.output_dir / f"{stem}.mp4").exists() and (self.output_dir / f"{stem}.json").exists()

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if prediction is None or prediction.get("videos") is None:
            return
        ckpt = getattr(trainer, "ckpt_path", None)
        for i, video in enumerate(prediction["videos"]):
            index, sample = int(prediction["index"][i]), int(prediction["sample"][i])
            stem = self.stem(prediction["text"][i], index, sample)
            write_mp4(self.output_dir / f"{stem}.mp4", video.numpy(), fps=self.fps, upscale=self.upscale)
            if self.save_latents:
                import torch

                torch.save(prediction["latents"][i].clone(), self.output_dir / f"{stem}.pt")
            write_json_atomic(self.output_dir / f"{stem}.json", {
                "prompt": prediction["text"][i],
                "model_prompt": prediction["prompts"][i],
                "index": index,
                "sample": sample,
                "seed": int(prediction["seed"][i]),
                "sampler": prediction["sampler"],
                "checkpoint": str(ckpt) if ckpt else None,
                "fps": self.fps,
                "frames": int(video.shape[0]),
                "size": [int(video.shape[1]), int(video.shape[2])],
            })
            self.written += 1
