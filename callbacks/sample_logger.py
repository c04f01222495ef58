"""Logs sample videos to TensorBoard during training.

``SummaryWriter.add_video`` silently writes nothing with moviepy 2 (which removed the ``moviepy.editor`` module it
imports), so samples are logged as images instead: one row per prompt, frames left to right (``samples/<name>``), which
TensorBoard shows at every logged step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from einops import rearrange

from sfplus.modules.contract import VideoSource


def frame_grid(videos: torch.Tensor, upscale: int = 1) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] → uint8 image [3, B*H, T*W] (rows = videos, columns = frames)."""
    grid = rearrange(videos, "b t h w c -> c (b h) (t w)")
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return grid


class SampleLogger(L.Callback):
    """Every ``every_n_iterations`` iterations (the module's counter), generate ``prompts`` and log them.

    Args:
        prompts: what to generate (fixed noise per prompt, so images are comparable across steps).
        every_n_iterations: cadence in the module's iterations.
        upscale: nearest-neighbour upscaling of the logged image.
        seed: noise seed.
    """

    def __init__(self, prompts: list[str], every_n_iterations: int = 100, upscale: int = 4, seed: int = 0) -> None:
        if not prompts:
            raise ValueError("SampleLogger needs at least one prompt")
        self.prompts, self.every, self.upscale, self.seed = list(prompts), every_n_iterations, upscale, seed
        self._last_logged = -1

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(pl_module, VideoSource):
            raise TypeError(f"SampleLogger samples from a VideoSource (sfplus.modules.contract); "
                            f"{type(pl_module).__name__} is not one")
        it = pl_module.iteration
        # Every rank samples (sharded nets gather their weights collectively); rank 0 alone writes.
        if it % self.every or it == self._last_logged:
            return
        self._last_logged = it
        n = len(self.prompts)
        _, videos = pl_module.generate(self.prompts, torch.arange(n), torch.zeros(n, dtype=torch.long), self.seed)
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples", frame_grid(videos.cpu(), self.upscale), global_step=it)
