"""CausVid generator step: one generator call on data-simulated noisy inputs, docs/algorithms.md, 'CausVid'.

CausVid trains the few-step causal generator with DMD (:mod:`sfplus.objectives.dmd`, score timesteps from the
full range, no ``ts_schedule``) on a *single* generator step whose input is simulated from clean data latents:
every causal block picks one of the few-step timesteps ``t_k`` (constant within the block) and its frames are
``add_noise(x_clean, eps, t_k)`` (``x_clean`` itself where ``t_k = 0``). The reference noises one fresh copy of the
video per step and gathers; each frame uses exactly one of those copies, so one noise tensor is the same
distribution and is what we draw.

Teacher forcing (the generator sees clean context instead of its own noisy inputs for earlier blocks) is one parallel
WanDiT call on ``[clean frames ; noisy frames]`` (``clean_x=``, docs/wan_architecture.md, 'Teacher-forcing mode'): clean
tokens block-causal among themselves, noisy block j attending to clean blocks < j and to itself, both halves at the same
RoPE frame positions. As in the reference, the loss on block j reaches the weights also through the clean context's keys
and values. With a local attention window (which that mask does not model) it runs block by block through the KV cache
instead: the same forward values, but the cache holds the clean keys/values detached
(:class:`sfplus.nets.causal.KVCache`), so there the loss reaches the weights through block j's own forward only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, predict_x0, randn_like
from sfplus.nets.causal import BlockCausal, KVCache
from sfplus.objectives.timesteps import RandomSource, block_ranges, block_step_indices


def simulate_generator_inputs(
    x_clean: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    *,
    frames_per_block: int,
    independent_first_frame: bool = False,
    generator: RandomSource = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy generator inputs at per-block few-step timesteps.

    x_clean: [B, C, F, H, W] data latents; timesteps: the generator's step list (e.g. ``[1000, 937.5, 833.3, 625]``;
    a 0 entry means "clean"). noise: the Gaussian noise (drawn from ``generator`` after the step indices if None).
    Returns: x_in [B, C, F, H, W] in x_clean's dtype, t [B, F] float32 (constant within each block).
    """
    if x_clean.ndim != 5:
        raise ValueError(f"clean latents must be [B, C, F, H, W], got {tuple(x_clean.shape)}")
    table = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    if table.numel() == 0 or bool(((table < 0) | (table > 1000)).any()):
        raise ValueError(f"denoising steps {table.tolist()} must be a non-empty list of values in [0, 1000]")
    b, _, frames = x_clean.shape[:3]
    k = block_step_indices(b, frames, table.numel(), frames_per_block=frames_per_block,
                           independent_first_frame=independent_first_frame, generator=generator)
    t = table[k].to(x_clean.device)
    if noise is None:
        noise = randn_like(x_clean, generator)
    elif noise.shape != x_clean.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must match the clean latents {tuple(x_clean.shape)}")
    return add_noise(x_clean, noise, t), t


def _layout(causal: BlockCausal | None, frames: int) -> tuple[int, bool]:
    """(frames_per_block, independent_first_frame): the generator's blocks, or one block (bidirectional)."""
    if causal is None:
        return frames, False
    return causal.frames_per_block, causal.independent_first_frame


def _slice_cond(cond: Cond, start: int, stop: int) -> Cond:
    """cond for frames [start, stop): the per-frame I2V ``y`` is sliced, everything else is per sample."""
    return {k: (v[:, :, start:stop] if k == "y" else v) for k, v in cond.items()}


def causvid_generator_output(
    net: FlowNet,
    x_clean: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    cond: Cond,
    causal: BlockCausal | None,
    generator: RandomSource = None,
    teacher_forcing: bool = False,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generator's x0 prediction [B, C, F, H, W] (fp32, with grad) on simulated inputs (docs/algorithms.md,
    'CausVid').

    net: the generator (a WanDiT, or any flow net accepting ``causal=``; teacher forcing needs a WanDiT-like net
        with ``.config`` and ``kv_cache=``/``frame_offset=``).
    causal: the generator's block layout (``None``: bidirectional generator, one block → one step per sample).
    teacher_forcing: earlier blocks are seen clean (t = 0) instead of noisy; see the module docstring.
    noise: optional fixed noise for the input simulation (see :func:`simulate_generator_inputs`).
    """
    frames = x_clean.shape[2]
    fpb, first = _layout(causal, frames)
    x_in, t = simulate_generator_inputs(x_clean, timesteps, frames_per_block=fpb, independent_first_frame=first,
                                        generator=generator, noise=noise)
    if not teacher_forcing:
        kw = {} if causal is None else {"causal": causal}
        return predict_x0(lambda x, tt, **c: net(x, tt, **c, **kw), x_in, t, cond)
    if causal is None:
        raise ValueError("CausVid teacher forcing needs a causal generator (causal=BlockCausal(...))")
    return teacher_forced_x0(net, x_clean, x_in, t, cond, causal)


def teacher_forced_x0(net, x_clean, x_in, t, cond: Cond, causal: BlockCausal,
                      context_t: torch.Tensor | None = None) -> torch.Tensor:
    """x0 [B, C, F, H, W] of ``x_in`` at ``t`` [B, F] under teacher forcing: block j sees the blocks < j of
    ``x_clean`` at ``context_t`` [B, F] (default 0: clean; the noise-augmented context of causal diffusion training
    passes its augmentation level). One parallel call, or block by block with a local window (module docstring)."""
    if causal.local_window_frames is None:
        parallel = lambda x, tt, **c: net(x, tt, **c, causal=causal, clean_x=x_clean, clean_t=context_t)  # noqa: E731
        return predict_x0(parallel, x_in, t, cond)
    config = getattr(net, "config", None)
    if config is None or not hasattr(config, "patch_size"):
        raise ValueError("teacher forcing runs through the KV cache and needs a WanDiT generator (with .config); "
                         f"got {type(net).__name__}")
    pt, ph, pw = config.patch_size
    if pt != 1:
        raise ValueError("teacher forcing assumes one latent frame per token frame, got patch_size "
                         f"{config.patch_size}")
    b, _, frames, h, w = x_clean.shape
    cache = KVCache(config, b, frames, (h // ph) * (w // pw), local_window_frames=causal.local_window_frames,
                    sink_frames=causal.sink_frames)
    ranges = block_ranges(frames, frames_per_block=causal.frames_per_block,
                          independent_first_frame=causal.independent_first_frame)
    outs = []
    for j, (start, stop) in enumerate(ranges):
        cond_j = _slice_cond(cond, start, stop)
        # Called right below, inside this iteration: binding the loop's `start` late is what is meant.
        step = lambda x, tt, **c: net(x, tt, **c, kv_cache=cache, frame_offset=start)  # noqa: E731, B023
        outs.append(predict_x0(step, x_in[:, :, start:stop], t[:, start:stop], cond_j))
        if j + 1 < len(ranges):  # overwrite this block's cache slot with its clean version, seen by later blocks
            with torch.no_grad():
                clean = x_clean[:, :, start:stop]
                ctx_t = (torch.zeros(b, stop - start, device=t.device) if context_t is None
                         else context_t[:, start:stop])
                net(clean, ctx_t, **cond_j, kv_cache=cache, frame_offset=start)
    return torch.cat(outs, dim=2)
