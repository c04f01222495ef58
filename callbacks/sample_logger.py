"""Logs sample videos to TensorBoard during training, as moving pictures.

Every ``every_n_iterations`` iterations the generator and its EMA (once the EMA started) generate the same prompts
from the same seeds; at the first logging step the teacher does too, from those seeds, so its row is the reference to
compare against. Each is one animated GIF in TensorBoard's image plugin (tag ``samples/<weights>``), the prompts side
by side (``samples/generator``, ``samples/ema``, ``samples/teacher``).

Why GIFs in the image plugin and not ``SummaryWriter.add_video``: ``add_video`` encodes through moviepy and silently
writes nothing with moviepy 2 (which removed the ``moviepy.editor`` module it imports). TensorBoard's own video
summaries *are* animated GIFs in an image summary, so writing that summary directly needs only Pillow (already a
dependency of TensorBoard) and shows the same way in the browser.

Image-to-video nets take their first frames from the first training batch the logger sees (kept on the CPU, reused
at every step). Every rank generates (sharded nets gather weights collectively); only rank 0 decodes the latents
through the codec (the real VAE for Wan) and writes; the time of generation and of decoding is logged as
``samples/generate_seconds`` and ``samples/decode_seconds``.
"""

from __future__ import annotations

import io
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from einops import rearrange
from tensorboard.compat.proto.summary_pb2 import Summary

from sfplus.modules.contract import VideoSource
from sfplus.modules.generation import to_uint8_video


def side_by_side(videos: torch.Tensor, upscale: int = 1) -> np.ndarray:
    """uint8 [B, T, H, W, 3] → uint8 frames [T, H*upscale, B*W*upscale, 3] (the videos side by side)."""
    frames = rearrange(videos, "b t h w c -> t h (b w) c")
    if upscale > 1:
        frames = frames.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return frames.cpu().numpy()


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 frames [T, H, W, 3] → an endlessly looping animated GIF (one 256-colour palette per frame)."""
    from PIL import Image

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    out = io.BytesIO()
    # GIF delays are in 1/100 s; Pillow takes ms. disposal=1: frames are whole, nothing to clear between them.
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   disposal=1, optimize=False)
    return out.getvalue()


def video_summary(tag: str, frames: np.ndarray, fps: float):
    """A TensorBoard image summary holding ``frames`` [T, H, W, 3] as an animated GIF (what ``add_video`` writes)."""
    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class SampleLogger(L.Callback):
    """Every ``every_n_iterations`` iterations (the module's counter), generate ``prompts`` and log them as videos.

    Args:
        prompts: what to generate (fixed noise per prompt, so videos are comparable across steps and weights).
        every_n_iterations: cadence in the module's iterations.
        upscale: nearest-neighbour upscaling of the logged frames.
        seed: noise seed.
        fps: playback speed of the logged videos.
        weights: which of the module's weights to sample every time (``module.sample_weights()`` names them;
            "teacher" is only logged once, see ``teacher``). None: all but the teacher; the EMA only once started.
        teacher: also log the teacher (if the module has one) at the first logging step, from the same seeds.
        teacher_steps, teacher_shift: the teacher's Euler CFG sampler (shift None: the module's timestep shift).
    """

    def __init__(self, prompts: list[str], every_n_iterations: int = 100, upscale: int = 4, seed: int = 0,
                 fps: float = 8.0, weights: list[str] | None = None, teacher: bool = True, teacher_steps: int = 40,
                 teacher_shift: float | None = None) -> None:
        if not prompts:
            raise ValueError("SampleLogger needs at least one prompt")
        if every_n_iterations < 1 or upscale < 1 or fps <= 0 or teacher_steps < 1:
            raise ValueError(f"SampleLogger: every_n_iterations, upscale and teacher_steps must be >= 1 and fps > 0, "
                             f"got {every_n_iterations}, {upscale}, {teacher_steps}, {fps}")
        self.prompts, self.every, self.upscale, self.seed = list(prompts), every_n_iterations, upscale, seed
        self.fps, self.weights, self.teacher = fps, (list(weights) if weights is not None else None), teacher
        self.teacher_options = {"steps": teacher_steps, **({} if teacher_shift is None else {"shift": teacher_shift})}
        self._last_logged = -1
        self._teacher_logged = False
        self._images: dict | None = None  # the I2V first frames: {"first_frame": [B, 3, H, W]} from the first batch

    def _first_frames(self, pl_module: Any, batch: Any) -> dict | None:
        if not getattr(pl_module, "is_i2v", False):
            return None
        if self._images is None:
            images = batch.get("first_frame", batch.get("image")) if isinstance(batch, dict) else None
            if images is None:
                raise KeyError("SampleLogger: the image-to-video net needs first frames, and the training batch has "
                               "neither 'first_frame' nor 'image'")
            n = len(self.prompts)
            rows = [i % len(images) for i in range(n)]  # more prompts than batch rows: the frames repeat
            self._images = {"first_frame": images[rows].detach().cpu()}
        return pl_module.image_condition(self._images)

    def _to_sample(self, pl_module: Any) -> list[tuple[str, dict]]:
        offered = tuple(pl_module.sample_weights()) if hasattr(pl_module, "sample_weights") else ()
        if self.weights is not None:
            unknown = [w for w in self.weights if w not in offered]
            if unknown:
                raise ValueError(f"SampleLogger weights {unknown} are not among {type(pl_module).__name__}'s "
                                 f"{list(offered)}")
            names = [w for w in self.weights if w != "teacher"]
        else:
            names = [w for w in offered if w != "teacher"]
        ema_on = bool(getattr(pl_module, "ema_started", True))
        runs: list[tuple[str, dict]] = [(w, {}) for w in names if w != "ema" or ema_on]
        if not offered:
            runs = [("samples", {})]  # a module without named weights: its default choice
        if self.teacher and "teacher" in offered and not self._teacher_logged:
            runs.append(("teacher", self.teacher_options))
        return runs

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(pl_module, VideoSource):
            raise TypeError(f"SampleLogger samples from a VideoSource (sfplus.modules.contract); "
                            f"{type(pl_module).__name__} is not one")
        it = pl_module.iteration
        if it % self.every or it == self._last_logged:
            return
        self._last_logged = it
        n = len(self.prompts)
        index, sample = torch.arange(n), torch.zeros(n, dtype=torch.long)
        image = self._first_frames(pl_module, batch)
        writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_scalar")]
        for name, options in self._to_sample(pl_module):
            # Every rank generates (a sharded net's forward is collective); rank 0 alone decodes and writes.
            start = time.perf_counter()
            if name == "samples":
                latents = pl_module.generate_latents(self.prompts, index, sample, self.seed, image)
            else:
                with pl_module.using_weights(name, **options):
                    latents = pl_module.generate_latents(self.prompts, index, sample, self.seed, image)
            generated = time.perf_counter()
            if name == "teacher":
                self._teacher_logged = True
            if trainer.global_rank != 0:
                continue
            videos = to_uint8_video(pl_module.conditioner.decode(latents)).cpu()
            decoded = time.perf_counter()
            tag = "samples" if name == "samples" else f"samples/{name}"
            summary = video_summary(tag, side_by_side(videos, self.upscale), self.fps)
            for writer in writers:
                _file_writer(writer).add_summary(summary, it)
                writer.add_scalar(f"{tag}/generate_seconds", generated - start, it)
                writer.add_scalar(f"{tag}/decode_seconds", decoded - generated, it)


def _file_writer(writer: Any):
    """The event-file writer behind a ``SummaryWriter`` (torch's, or tensorboardX's), for a raw summary proto."""
    get = getattr(writer, "_get_file_writer", None)
    if get is None:
        raise TypeError(f"SampleLogger writes to TensorBoard SummaryWriters; {type(writer).__name__} is not one")
    return get()
