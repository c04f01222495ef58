"""Streaming generation with a causal WanDiT: latent blocks as soon as they are done, pixels block by block.

* `causal_generate` — the few-step autoregressive sampler (docs/algorithms.md, 'Causal few-step sampler'): for each
  block run every step of the few-step list (predict x0, re-noise with fresh noise to the next step), yield the block's
  final x0, then refresh the block's KV-cache slots with the context (``add_noise(x0, eps, context_noise)`` at ``t =
  context_noise``, exactly as in training: B4 in docs/algorithms.md, 'Reference bugs'); the last block, which no block
  reads, is not refreshed. Any number of frames: with ``local_window_frames`` (+ ``sink_frames``) the cache is a ring of
  bounded size, so videos longer than the training length stream in constant memory per step.
* `stream_video` — decodes latent blocks through the codec's streaming decoder (causal caches carried over), so the
  concatenated pixel blocks equal one decode of the whole latent video.
* `causal_sample` — `causal_generate` concatenated.

Makes ``len(context blocks) + blocks × (steps + 1) - 1`` net calls (the last block needs no refresh), no hard-coded
model or resolution sizes (B1 in docs/algorithms.md, 'Reference bugs').
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet
from sfplus.nets.codec import VideoCodec
from sfplus.rollout.causal import CallCounter, prepare_causal_generation, run_causal_blocks

__all__ = ["causal_generate", "causal_sample", "stream_video"]


def causal_generate(
    net: FlowNet,
    noise: torch.Tensor,
    timesteps: Sequence[float],
    cond: Cond,
    *,
    frames_per_block: int,
    generator: torch.Generator | None = None,
    independent_first_frame: bool = False,
    initial_latent: torch.Tensor | None = None,
    local_window_frames: int | None = None,
    sink_frames: int = 0,
    context_noise: float = 0.0,
    include_initial: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the video's latent blocks in order, each as soon as it is final (inputs are checked at call time).

    Args:
        net: a causal-capable WanDiT.
        noise: [B, C, F, H, W] noise of the frames to generate (any F that fits the block layout; with a window,
            F may exceed the training length).
        timesteps: the warped few-step list, e.g. [1000, 937.5, 833.33, 625] (a trailing 0 is ignored).
        cond: {"context", optional "clip_fea", optional "y" [B, C_y, F0 + F, H, W]}.
        frames_per_block, independent_first_frame: the block layout (`sfplus.rollout.causal.block_layout`).
        generator: source of the re-noising (and context) noise.
        initial_latent: [B, C, F0, H, W] given leading frames (I2V first frame, video extension), written to the
            cache first.
        local_window_frames, sink_frames: rolling attention window + attention sink (`KVCache`).
        context_noise: timestep of the cached context (0 = exactly clean, as the released models).
        include_initial: yield ``initial_latent`` (fp32) first, so the stream covers the whole video.
    Yields: fp32 latent blocks [B, C, n, H, W] (``n = frames_per_block``, or 1 for a lone first frame).
    """
    layout, steps, cache = prepare_causal_generation(net, noise, timesteps, frames_per_block, independent_first_frame,
                                                     initial_latent, context_noise, local_window_frames, sink_frames)
    return _generate(net, noise, steps, cond, layout, cache, generator, initial_latent, context_noise,
                     include_initial)


@torch.no_grad()  # on a generator function torch sets the mode around each step only: it never leaks to the caller
def _generate(net, noise, steps, cond, layout, cache, generator, initial_latent, context_noise, include_initial):
    if initial_latent is not None and include_initial:
        yield initial_latent.float()
    exits = [len(steps) - 1] * len(layout.generated)
    for _, x0 in run_causal_blocks(net, noise, steps, cond, layout, exits, grad_from_frame=0, grad=False,
                                   context_noise=context_noise, generator=generator, cache=cache,
                                   initial_latent=initial_latent, counter=CallCounter()):
        yield x0


def causal_sample(net: FlowNet, noise: torch.Tensor, timesteps: Sequence[float], cond: Cond, **kwargs) -> torch.Tensor:
    """`causal_generate` run to the end and concatenated: [B, C, F0 + F, H, W] fp32 (F0 only if include_initial)."""
    return torch.cat(list(causal_generate(net, noise, timesteps, cond, **kwargs)), dim=2)


def stream_video(latent_blocks: Iterable[torch.Tensor], codec: VideoCodec) -> Iterator[torch.Tensor]:
    """Decode consecutive latent blocks [B, C, n, h, w] of one video; yields their pixel frames [B, 3, T_n, H, W].

    The first block gives ``1 + s·(n - 1)`` frames, later ones ``s·n`` (s = the codec's temporal stride); together
    they equal ``codec.decode`` of the concatenated latents. Runs without grad.
    """
    decoder = codec.stream_decoder()
    for block in latent_blocks:
        with torch.no_grad():  # not held across the yield: the consumer's grad mode stays its own
            pixels = decoder.decode(block)
        yield pixels
