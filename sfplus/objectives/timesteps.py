"""Per-block timestep sampling for causal objectives (ODE regression, CausVid, diffusion forcing),
docs/algorithms.md, 'Per-block timesteps'.

A causal video is cut into blocks of ``frames_per_block`` frames (with ``independent_first_frame`` frame 0 is a
block of its own); every frame of a block shares one noise level, different blocks draw independently. This is the
reference's non-uniform ``_get_timestep`` (one draw per frame, then each block takes its first frame's value), done
as one draw per block. The block layout is the one of :class:`sfplus.nets.causal.BlockCausal` (a shorter last block
is allowed, as there).

Random sources: a ``torch.Generator`` (draws on its own device), a :class:`sfplus.noise.SampleNoise` (one stream
per sample, so a sample's draws do not depend on how the batch is split across ranks) or ``None`` (global RNG).
"""

from __future__ import annotations

import torch

from sfplus.flow import NUM_TRAIN_TIMESTEPS, shift_sigma
from sfplus.nets.causal import BlockCausal, block_frame_ends
from sfplus.noise import SampleNoise

RandomSource = torch.Generator | SampleNoise | None


def block_ranges(frames: int, *, frames_per_block: int, independent_first_frame: bool) -> list[tuple[int, int]]:
    """``(start, stop)`` frame ranges of the causal blocks of a ``frames``-frame video, in order."""
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got frames={frames}")
    causal = BlockCausal(frames_per_block, independent_first_frame=independent_first_frame)
    ends = sorted(set(block_frame_ends(causal, frames)))
    return list(zip([0] + ends[:-1], ends))


def block_of_frame(frames: int, *, frames_per_block: int, independent_first_frame: bool) -> torch.Tensor:
    """LongTensor [F]: the block index of each frame."""
    out = torch.empty(frames, dtype=torch.long)
    for j, (start, stop) in enumerate(block_ranges(frames, frames_per_block=frames_per_block,
                                                   independent_first_frame=independent_first_frame)):
        out[start:stop] = j
    return out


def _randint(high: int, batch: int, n: int, generator: RandomSource) -> torch.Tensor:
    """[batch, n] integers in [0, high) on the CPU."""
    if isinstance(generator, SampleNoise):
        if len(generator) != batch:
            raise ValueError(f"SampleNoise has {len(generator)} streams for a batch of {batch}")
        return torch.stack([generator.randint(0, high) for _ in range(n)], dim=1).cpu().long()
    dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, high, (batch, n), generator=generator, device=dev).cpu()


def _rand(batch: int, n: int, generator: RandomSource) -> torch.Tensor:
    """[batch, n] uniforms in [0, 1) (float64, CPU)."""
    if isinstance(generator, SampleNoise):
        if len(generator) != batch:
            raise ValueError(f"SampleNoise has {len(generator)} streams for a batch of {batch}")
        return torch.stack([generator.rand() for _ in range(n)], dim=1).cpu().double()
    dev = generator.device if generator is not None else "cpu"
    return torch.rand(batch, n, generator=generator, device=dev, dtype=torch.float64).cpu()


def expand_blocks(per_block: torch.Tensor, frames: int, *, frames_per_block: int,
                  independent_first_frame: bool) -> torch.Tensor:
    """Repeat per-block values [B, n_blocks] over each block's frames → [B, F]."""
    owner = block_of_frame(frames, frames_per_block=frames_per_block,
                           independent_first_frame=independent_first_frame).to(per_block.device)
    n_blocks = int(owner[-1]) + 1
    if per_block.ndim != 2 or per_block.shape[1] != n_blocks:
        raise ValueError(f"per-block values must be [B, {n_blocks}] for {frames} frames, got {tuple(per_block.shape)}")
    return per_block[:, owner]


def block_step_indices(
    batch: int,
    frames: int,
    num_steps: int,
    *,
    frames_per_block: int,
    independent_first_frame: bool = False,
    generator: RandomSource = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Step indices ``k ~ U{0, ..., num_steps - 1}``, one per (sample, block), constant inside each block.

    Returns: LongTensor [B, F] on ``device``.
    """
    if batch < 1 or num_steps < 1:
        raise ValueError(f"block_step_indices needs batch >= 1 and num_steps >= 1, got {batch} and {num_steps}")
    n_blocks = len(block_ranges(frames, frames_per_block=frames_per_block,
                                independent_first_frame=independent_first_frame))
    k = _randint(num_steps, batch, n_blocks, generator)
    return expand_blocks(k, frames, frames_per_block=frames_per_block,
                         independent_first_frame=independent_first_frame).to(device)


def block_training_timesteps(
    batch: int,
    frames: int,
    *,
    frames_per_block: int,
    independent_first_frame: bool = False,
    shift: float = 1.0,
    generator: RandomSource = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Continuous per-block diffusion-forcing timesteps [B, F] (float32, constant inside each block).

    Per block ``sigma ~ U(0, 1]`` pushed through the shift, times 1000 — the continuous counterpart of the
    reference's per-block index into the shifted 1000-point grid (docs/algorithms.md, 'Per-block timesteps'), with
    ``sigma > 0`` always.
    """
    n_blocks = len(block_ranges(frames, frames_per_block=frames_per_block,
                                independent_first_frame=independent_first_frame))
    u = 1.0 - _rand(batch, n_blocks, generator)
    t = (NUM_TRAIN_TIMESTEPS * shift_sigma(u, shift)).float()
    return expand_blocks(t, frames, frames_per_block=frames_per_block,
                         independent_first_frame=independent_first_frame).to(device)


def gather_steps(stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick, for every (sample, frame), the frame of step ``index[b, f]``.

    stack: [B, K, C, F, H, W]; index: LongTensor [B, F] in [0, K). Returns [B, C, F, H, W].
    """
    if stack.ndim != 6:
        raise ValueError(f"step stack must be [B, K, C, F, H, W], got {tuple(stack.shape)}")
    b, k, c, f, h, w = stack.shape
    if index.shape != (b, f):
        raise ValueError(f"step index must be [B={b}, F={f}], got {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= k):
        raise ValueError(f"step index out of range [0, {k}): min {int(index.min())}, max {int(index.max())}")
    idx = index.to(stack.device).view(b, 1, 1, f, 1, 1).expand(b, 1, c, f, h, w)
    return stack.gather(1, idx).squeeze(1)
