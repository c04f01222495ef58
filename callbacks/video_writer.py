"""Prediction writer: one MP4 and one JSON sidecar per generated video, atomic, resumable."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
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
        progress_every_s: print a progress line (videos written, videos/s, batches left, ETA) at most this often
            per rank, also shown on a tqdm progress bar; 0 prints after every batch.
    """

    def __init__(self, output_dir: str = "outputs", fps: int = 16, upscale: int = 1, save_latents: bool = False,
                 progress_every_s: float = 30.0) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.fps, self.upscale, self.save_latents = Path(output_dir), fps, upscale, save_latents
        self.progress_every_s = float(progress_every_s)
        self.written = 0
        self._start: float | None = None
        self._last_report: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create output folder {self.output_dir}: {err.strerror}") from None
        if not os.access(self.output_dir, os.W_OK):
            raise PermissionError(f"output folder {self.output_dir} is not writable")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self.written, self._last_report = time.perf_counter(), 0, None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        took = time.perf_counter() - (self._start or time.perf_counter())
        rate = self.written / took if took > 0 else 0.0
        print(f"[rank {trainer.global_rank}] wrote {self.written} videos to {self.output_dir} in {took:.1f} s "
              f"({rate:.2f} videos/s); existing outputs were skipped", flush=True)

    def progress(self, trainer: L.Trainer, batch_idx: int) -> str:
        """``"12 videos, 0.41 videos/s, batch 3/8, ETA 61 s"`` for this rank since predict started."""

        took = time.perf_counter() - (self._start or time.perf_counter())
        rate = self.written / took if took > 0 else 0.0
        totals = getattr(trainer, "num_predict_batches", None) or [0]
        total, done = int(sum(totals)), batch_idx + 1
        eta = f", ETA {took / done * (total - done):.0f} s" if total >= done > 0 else ""
        return f"{self.written} videos, {rate:.2f} videos/s, batch {done}/{total or '?'}{eta}"

    def _report(self, trainer: L.Trainer, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_report is not None and now - self._last_report < self.progress_every_s:
            return
        self._last_report = now
        line = self.progress(trainer, batch_idx)
        try:  # tqdm bar: show it there too (the rich bar has no postfix; its property raises before predict)
            bar = trainer.progress_bar_callback.predict_progress_bar
            bar.set_postfix_str(line.split(", batch")[0])
        except (AttributeError, TypeError):
            pass
        print(f"[rank {trainer.global_rank}] {line}", flush=True)

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
            self._report(trainer, batch_idx)
            return
        ckpt = getattr(trainer, "ckpt_path", None)
        for i, video in enumerate(prediction["videos"]):
            index, sample = int(prediction["index"][i]), int(prediction["sample"][i])
            stem = self.stem(prediction["text"][i], index, sample)
            write_mp4(self.output_dir / f"{stem}.mp4", video.numpy(), fps=self.fps, upscale=self.upscale)
            if self.save_latents:
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
        self._report(trainer, batch_idx)
