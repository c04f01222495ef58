"""ODE regression: initialise a few-step (causal) generator on teacher ODE trajectories, docs/algorithms.md, 'ODE
regression'.

Data per sample: a teacher trajectory ``[K, C, F, H, W]`` of snapshots at the (warped) step timesteps, ordered
noisiest → clean; the last snapshot is the clean end at t = 0. Each causal block picks one snapshot index ``k``
(constant inside the block), the generator predicts x0 from the picked snapshots in one parallel (block-causal)
forward, and the loss is the MSE to the clean end over the frames whose picked timestep is not 0 — frames picked at
the clean end are clean context only (their x0 is their input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, predict_x0
from sfplus.nets.causal import BlockCausal
from sfplus.objectives.timesteps import RandomSource, block_step_indices, gather_steps


def _check_layout(causal: BlockCausal | None, frames_per_block: int, independent_first_frame: bool) -> None:
    if causal is not None and (causal.frames_per_block, causal.independent_first_frame) != (
            frames_per_block, independent_first_frame):
        raise ValueError(
            f"block layout frames_per_block={frames_per_block}, independent_first_frame={independent_first_frame} "
            f"differs from the generator's BlockCausal({causal.frames_per_block}, "
            f"independent_first_frame={causal.independent_first_frame})")


def _timestep_table(timesteps: Sequence[float] | torch.Tensor, k: int, device) -> torch.Tensor:
    table = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    if table.numel() != k:
        raise ValueError(f"{table.numel()} timesteps given for a trajectory of {k} snapshots (the step timesteps "
                         "plus 0 for the clean end)")
    if bool(((table < 0) | (table > 1000)).any()):
        raise ValueError(f"trajectory timesteps {table.tolist()} must lie in [0, 1000]")
    return table.to(device)


def ode_regression_inputs(
    trajectory: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    *,
    frames_per_block: int,
    independent_first_frame: bool = False,
    generator: RandomSource = None,
    i2v_first_frame: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample per-block snapshot indices and gather the generator inputs.

    trajectory: [B, K, C, F, H, W]; timesteps: the K snapshot timesteps (noisiest first, last = 0).
    i2v_first_frame: frame 0 takes the clean end (the conditioning image's frame).
    Returns: x_in [B, C, F, H, W], t [B, F] float32, k [B, F] long.
    """
    if trajectory.ndim != 6:
        raise ValueError(f"ODE trajectory must be [B, K, C, F, H, W], got {tuple(trajectory.shape)}")
    b, k_steps, _, frames = trajectory.shape[:4]
    table = _timestep_table(timesteps, k_steps, trajectory.device)
    k = block_step_indices(b, frames, k_steps, frames_per_block=frames_per_block,
                           independent_first_frame=independent_first_frame, generator=generator,
                           device=trajectory.device)
    if i2v_first_frame:
        k[:, 0] = k_steps - 1
    return gather_steps(trajectory, k), table[k], k


def ode_regression_loss(
    net: FlowNet,
    trajectory: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    cond: Cond,
    *,
    frames_per_block: int,
    independent_first_frame: bool = False,
    causal: BlockCausal | None = None,
    generator: RandomSource = None,
    i2v_first_frame: bool = False,
) -> torch.Tensor:
    """ODE-regression loss (docs/algorithms.md, 'ODE regression'): ``mean over frames with t != 0 of (x0_pred -
    x_clean)^2``.

    net: the generator, a flow net ``net(x, t [B, F], **cond[, causal=...]) -> v``; called once with
        ``causal=causal`` when given (parallel block-causal mode), else with full attention.
    trajectory: [B, K, C, F, H, W] teacher snapshots, noisiest → clean; timesteps: their K timesteps (the
        K - 1 warped steps, then 0). causal's block layout must match frames_per_block / independent_first_frame.
    Returns: float32 scalar (0 attached to the graph if every frame happened to pick the clean end).
    """
    _check_layout(causal, frames_per_block, independent_first_frame)
    x_in, t, _ = ode_regression_inputs(trajectory, timesteps, frames_per_block=frames_per_block,
                                       independent_first_frame=independent_first_frame, generator=generator,
                                       i2v_first_frame=i2v_first_frame)
    kw = {} if causal is None else {"causal": causal}
    x0 = predict_x0(lambda x, tt, **c: net(x, tt, **c, **kw), x_in, t, cond)  # [B, C, F, H, W] fp32
    err = (x0 - trajectory[:, -1].float()) ** 2
    keep = (t != 0)  # [B, F]
    if not bool(keep.any()):
        return (x0 * 0).sum()  # keeps every parameter on the graph (DDP) with a zero gradient
    per_frame = err.mean(dim=(1, 3, 4))  # [B, F]; every frame has the same C·H·W element count
    return per_frame[keep].mean()
