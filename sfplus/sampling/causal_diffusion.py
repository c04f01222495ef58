"""Many-step autoregressive sampling of a causal *diffusion* model
(docs/algorithms.md, 'Causal diffusion sampler').

A model pre-trained with teacher forcing (sfplus.modules.DiffusionModule with ``causal`` and ``teacher_forcing``)
learned to denoise a block while attending to CLEAN earlier blocks. Denoising all frames together under the
block-causal mask would show it noisy context it never saw in training, so it is sampled block by block:

1. the block's frames start from its own noise and run a full multi-step flow solver (Euler or UniPC, Wan's shift),
   every step a KV-cache call at the block's frame offset, with CFG ``v = v_u + g (v_c - v_u)`` through two caches
   (conditional and unconditional prompts see different cross-attention contexts);
2. the finished block is written into both caches as clean context (``t = 0``), overwriting the slots its solver
   steps used, and the next block starts.

Initial latents (I2V first frame, video extension) are written into the caches first, also at ``t = 0``. Makes
``blocks · steps · (2 with CFG, else 1)`` solver calls plus one context write per cache for each block but the last
and for each initial block.
"""

from __future__ import annotations

from typing import Literal

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, timestep_tensor
from sfplus.rollout.causal import block_cond, block_layout, new_kv_cache
from sfplus.sampling.samplers import teacher_sample
from sfplus.sampling.unipc import unipc_sample

__all__ = ["causal_diffusion_sample"]


def _solve(net: FlowNet, noise: torch.Tensor, cond: Cond, uncond: Cond | None, sampler: str, **kw) -> torch.Tensor:
    solver = unipc_sample if sampler == "unipc" else teacher_sample
    return solver(net, noise, cond, uncond, **kw)


@torch.no_grad()
def causal_diffusion_sample(
    net: FlowNet,
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    *,
    frames_per_block: int,
    num_steps: int,
    shift: float,
    guidance_scale: float,
    sampler: Literal["euler", "unipc"] = "euler",
    independent_first_frame: bool = False,
    initial_latent: torch.Tensor | None = None,
    local_window_frames: int | None = None,
    sink_frames: int = 0,
) -> torch.Tensor:
    """Sample a causal diffusion model block by block; returns fp32 ``[B, C, F0 + F, H, W]``.

    Args:
        net: a causal-capable WanDiT (KV-cache stepping).
        noise: ``[B, C, F, H, W]`` noise of the frames to generate.
        cond, uncond: prompt conditioning (``uncond=None`` or ``guidance_scale == 1``: no CFG); ``y`` (I2V) covers
            all ``F0 + F`` frames and is sliced per block.
        frames_per_block, independent_first_frame: the block layout (`sfplus.rollout.causal.block_layout`).
        num_steps, shift, guidance_scale, sampler: the per-block multi-step solver.
        initial_latent: ``[B, C, F0, H, W]`` given leading frames, returned unchanged in front of the new ones.
        local_window_frames, sink_frames: rolling attention window + sink for videos past the training length.
    """
    if sampler not in ("euler", "unipc"):
        raise ValueError(f"sampler must be 'euler' or 'unipc', got {sampler!r}")
    b, _, frames, h, w = noise.shape
    f0 = 0 if initial_latent is None else initial_latent.shape[2]
    layout = block_layout(frames, frames_per_block, independent_first_frame=independent_first_frame,
                          initial_frames=f0)
    total = layout.total_frames
    use_cfg = uncond is not None and guidance_scale != 1.0
    conds = [cond, uncond] if use_cfg else [cond]
    caches = [new_kv_cache(net, b, total, h, w, local_window_frames=local_window_frames, sink_frames=sink_frames)
              for _ in conds]

    def block_conds(start: int, stop: int) -> list[Cond]:
        return [{**block_cond(c, start, stop, total), "kv_cache": cache, "frame_offset": start}
                for c, cache in zip(conds, caches)]

    def write_context(x0: torch.Tensor, start: int, stop: int) -> None:
        x = x0.to(noise.dtype)
        for c in block_conds(start, stop):
            net(x, timestep_tensor(0.0, x), **c)

    out = [] if initial_latent is None else [initial_latent.float()]
    for a, e in layout.context:
        write_context(initial_latent[:, :, a:e], a, e)
    for i, (a, e) in enumerate(layout.generated):
        per_block = block_conds(a, e)
        x0 = _solve(net, noise[:, :, a - f0:e - f0], per_block[0], per_block[1] if use_cfg else None, sampler,
                    num_steps=num_steps, shift=shift, guidance_scale=guidance_scale)
        out.append(x0)
        if i + 1 < len(layout.generated):
            write_context(x0, a, e)
    return torch.cat(out, dim=2)
