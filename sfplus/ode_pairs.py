"""Teacher ODE trajectories for the ODE-regression initialisation of a few-step / causal generator
(docs/algorithms.md, 'ODE regression').

The teacher solves the flow ODE from noise with many Euler steps and classifier-free guidance; a few snapshots of
the trajectory are kept. The ODE objective regresses the clean end point from the snapshot at each of the
generator's denoising steps, so **the snapshots must sit at the generator's warped steps**: the reference keeps
Euler indices [0, 12, 24, 36, 48] of a 48-step shift-8 schedule, i.e. the unshifted steps [1000, 750, 500, 250, 0]
mapped through the shift (t = [1000, 960, 888.9, 727.3, 0]). :func:`teacher_trajectory` takes those unshifted
steps and checks that they fall on Euler steps.

:func:`generate_ode_samples` runs it over prompts and writes one sample file per prompt (resumable); the shards
are then packed by ``tools/generate_ode_pairs.py`` / ``tools/make_shards.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sfplus.conditioning.conditioner import Cond, Conditioner
from sfplus.datamodules.shard_format import Sample, write_sample_file
from sfplus.flow import warp_timesteps
from sfplus.sampling.samplers import euler_cfg_states

REFERENCE_KEEP = (1000.0, 750.0, 500.0, 250.0, 0.0)  # unshifted; at shift 8 → [1000, 960, 888.9, 727.3, 0]


class TrajectoryError(ValueError):
    """Snapshot steps that do not fall on the Euler grid, or other bad trajectory arguments."""


def snapshot_indices(num_steps: int, keep_timesteps: Sequence[float]) -> list[int]:
    """Euler step index of each kept (unshifted) timestep: step ``i`` of ``N`` has unshifted t = 1000 (1 - i / N).

    Raises TrajectoryError when a kept step is not on the grid (e.g. 750 with 10 steps), naming the step counts
    that work.
    """
    if num_steps <= 0:
        raise TrajectoryError(f"num_steps must be positive, got {num_steps}")
    if not keep_timesteps:
        raise TrajectoryError("keep_timesteps is empty")
    out = []
    for k in keep_timesteps:
        if not 0.0 <= float(k) <= 1000.0:
            raise TrajectoryError(f"kept timestep {k} is outside [0, 1000]")
        pos = num_steps * (1000.0 - float(k)) / 1000.0
        i = round(pos)
        if abs(pos - i) > 1e-6:
            raise TrajectoryError(
                f"kept timestep {k} is not on the {num_steps}-step Euler grid (it would be step {pos:g}); "
                f"use a step count that makes 1000 - t a multiple of 1000 / steps for every kept t "
                f"(48 for the reference's [1000, 750, 500, 250, 0])"
            )
        out.append(i)
    if out != sorted(out):
        raise TrajectoryError(f"keep_timesteps must be decreasing (noisiest first), got {list(keep_timesteps)}")
    return out


def snapshot_timesteps(num_steps: int, shift: float, keep_timesteps: Sequence[float]) -> list[float]:
    """The actual (shifted) timesteps of the snapshots, 0..1000 scale; e.g. [1000, 960, 888.9, 727.3, 0] at shift 8."""
    snapshot_indices(num_steps, keep_timesteps)
    return warp_timesteps([float(k) for k in keep_timesteps], shift)


@torch.no_grad()
def teacher_trajectory(
    net: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    num_steps: int = 48,
    shift: float = 8.0,
    guidance: float = 6.0,
    keep_timesteps: Sequence[float] = REFERENCE_KEEP,
) -> torch.Tensor:
    """Euler-solve the teacher's flow ODE from ``noise`` with CFG and keep snapshots.

    The schedule is Wan's: sigmas ``linspace(1, 0, N + 1)`` mapped through ``shift``; each step
    ``x ← x + (sigma_{i+1} - sigma_i) v`` with ``v = v_u + g (v_c - v_u)`` (CFG on the flow; identical to the
    reference's CFG on x0, which is affine in v). ``uncond=None`` or ``guidance=1`` runs without CFG.

    Args:
        net: ``net(x [B, C, F, H, W], t [B, F], **cond) -> v``.
        noise: [B, C, F, H, W] start point (sigma 1); the net sees it in this dtype.
        cond, uncond: keyword arguments of the conditional / unconditional calls.
        num_steps: Euler steps N.
        shift: timestep shift of the schedule (8 in the reference's ODE-pair recipe).
        guidance: CFG scale (6 in the reference).
        keep_timesteps: *unshifted* timesteps of the snapshots, decreasing; 1000 is the noise, 0 the clean end.
    Returns:
        float32 [B, K, C, F, H, W], K = len(keep_timesteps), noisiest first; their actual timesteps are
        :func:`snapshot_timesteps` ``(num_steps, shift, keep_timesteps)``.
    """
    if noise.ndim != 5:
        raise TrajectoryError(f"noise must be [B, C, F, H, W], got {tuple(noise.shape)}")
    keep = snapshot_indices(num_steps, keep_timesteps)
    snaps = {}
    states = euler_cfg_states(net, noise, cond, uncond, num_steps=num_steps, shift=shift, guidance_scale=guidance)
    for i, x in enumerate(states):
        if i in keep:
            snaps[i] = x.clone()
        if i >= max(keep):
            break
    return torch.stack([snaps[i] for i in keep], dim=1)


def prompt_seed(seed: int, index: int) -> int:
    """Noise seed of prompt ``index``: independent of rank count and batch size, so reruns reproduce samples."""
    digest = hashlib.sha256(f"sfplus-ode:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_file(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / f"{index:08d}.safetensors"


@torch.no_grad()
def generate_ode_samples(
    net: Callable[..., torch.Tensor],
    conditioner: Conditioner,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    latent_shape: Sequence[int],
    *,
    num_steps: int = 48,
    shift: float = 8.0,
    guidance: float = 6.0,
    keep_timesteps: Sequence[float] = REFERENCE_KEEP,
    seed: int = 0,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<index:08d>.safetensors`` (a sample file with ``ode`` + ``ode_timesteps``) per prompt.

    Rank ``rank`` of ``world_size`` handles prompts ``rank, rank + W, ...``; prompts whose file exists are skipped
    (resumable), files are written atomically. The noise of prompt ``i`` comes from :func:`prompt_seed`, so the
    result does not depend on the split or the batch size.

    Args:
        latent_shape: (C, F, H, W) of one latent video (Wan2.1 at 81×480×832: (16, 21, 60, 104)).
        dtype: dtype of the noise the net sees (the net's own dtype is the caller's choice).
        storage_dtype: dtype of the stored trajectory.
    Returns: the files this rank wrote.
    """

    if len(latent_shape) != 4:
        raise TrajectoryError(f"latent_shape must be (C, F, H, W), got {tuple(latent_shape)}")
    if not 0 <= rank < world_size:
        raise TrajectoryError(f"rank {rank} is outside [0, {world_size})")
    timesteps = torch.tensor(snapshot_timesteps(num_steps, shift, keep_timesteps), dtype=torch.float32)
    todo = [i for i in range(rank, len(prompts), world_size) if not sample_file(out_dir, i).exists()]
    written: list[Path] = []
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        noise = torch.stack([
            torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(prompt_seed(seed, i)))
            for i in idx
        ]).to(device=device, dtype=dtype)  # fmt: skip
        cond = conditioner.text([prompts[i] for i in idx], device=torch.device(device))
        uncond = conditioner.negative(len(idx), device=torch.device(device))
        traj = teacher_trajectory(net, noise, cond, uncond, num_steps, shift, guidance, keep_timesteps).cpu()
        for k, i in enumerate(idx):
            path = sample_file(out_dir, i)
            sample = Sample(
                key=f"{i:08d}", prompt=prompts[i], ode=traj[k].to(storage_dtype), ode_timesteps=timesteps,
                meta={"prompt_index": str(i), "seed": str(prompt_seed(seed, i)), "guidance": str(guidance),
                      "num_steps": str(num_steps), "shift": str(shift)},
            )  # fmt: skip
            write_sample_file(path, sample)
            written.append(path)
        if progress is not None:
            progress(min(b + batch_size, len(todo)), len(todo))
    return written
