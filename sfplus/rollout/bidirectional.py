"""Training rollouts: the generator runs its own few-step sampler, with a gradient through one exit step only.

This is DMD2-style backward simulation (docs/algorithms.md, 'Backward simulation (bidirectional rollout)'): steps before
the exit step run without grad and their re-noised output feeds the next step; the exit step's x0 carries the graph to
the generator's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, predict_x0, randn_like, timestep_tensor


@dataclass
class Rollout:
    """What a rollout returns.

    Attributes:
        x0: the exit step's clean estimate [B, C, F, H, W] (fp32, carries grad when the rollout did).
        exit_index: the step the rollout stopped at (-1: no few-step chain, e.g. CausVid's one generator step).
        t_from: timestep of the exit step's input (warped scale); None where there is no single exit step.
        t_to: timestep of the step that would follow (0 after the last step); None likewise.
        calls: number of generator evaluations made.
        loss_mask: bool [B, C, F, H, W], False where ``x0`` must not enter the generator's loss (a long causal
            rollout's re-encoded first frames); None: everything counts.
    """

    x0: torch.Tensor
    exit_index: int
    t_from: float | None
    t_to: float | None
    calls: int
    loss_mask: torch.Tensor | None = field(default=None, kw_only=True)


def bidirectional_rollout(
    net: FlowNet,
    noise: torch.Tensor,
    timesteps: Sequence[float],
    cond: Cond,
    exit_index: int,
    generator: torch.Generator | None = None,
    grad: bool = True,
) -> Rollout:
    """Run steps ``0..exit_index`` of the few-step sampler; only the last call records a graph (if ``grad``).

    Makes exactly ``exit_index + 1`` calls of ``net``.
    """
    steps = [float(t) for t in timesteps if float(t) > 0]
    if not 0 <= exit_index < len(steps):
        raise ValueError(f"exit_index {exit_index} outside the {len(steps)} denoising steps")
    x = noise
    with torch.no_grad():
        for j in range(exit_index):
            x0 = predict_x0(net, x, timestep_tensor(steps[j], x), cond)
            x = add_noise(x0, randn_like(x0, generator), timestep_tensor(steps[j + 1], x0)).to(noise.dtype)
    with torch.set_grad_enabled(grad):
        x0 = predict_x0(net, x, timestep_tensor(steps[exit_index], x), cond)
    t_to = steps[exit_index + 1] if exit_index + 1 < len(steps) else 0.0
    return Rollout(x0, exit_index, steps[exit_index], t_to, exit_index + 1)
