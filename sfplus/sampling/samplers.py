"""Samplers over any flow-predicting net ``net(x [B,C,F,H,W], t [B] | [B,F], **cond) -> v [B,C,F,H,W]``.

* :func:`few_step_sample` — the distilled generators' sampler (docs/algorithms.md, 'Few-step sampler': every step runs):
  predict x0, re-noise with fresh noise to the next timestep, return the last x0.
* :func:`teacher_sample` — multi-step Euler flow solver with Wan's CFG convention ``v_u + g (v_c - v_u)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, predict_x0, randn_like, shift_sigma, timestep_tensor


@torch.no_grad()
def few_step_sample(
    net: FlowNet,
    noise: torch.Tensor,
    timesteps: Sequence[float],
    cond: Cond,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step sampling: exactly ``len(timesteps)`` evaluations of ``net``.

    Args:
        noise: [B, C, F, H, W] starting noise (at ``timesteps[0]``, normally 1000).
        timesteps: decreasing list, e.g. ``[1000, 937.5, 833.33, 625]`` (a trailing 0 is ignored).
        generator: source of the re-noising noise between steps.
    Returns: x0 of the last step, fp32 [B, C, F, H, W].
    """
    steps = [float(t) for t in timesteps if float(t) > 0]
    if not steps:
        raise ValueError("few_step_sample needs at least one positive timestep")
    x = noise
    x0 = noise
    for j, t in enumerate(steps):
        x0 = predict_x0(net, x, timestep_tensor(t, x), cond)
        if j + 1 < len(steps):
            x = add_noise(x0, randn_like(x0, generator), timestep_tensor(steps[j + 1], x0)).to(noise.dtype)
    return x0


def euler_sigmas(num_steps: int, shift: float) -> list[float]:
    """Wan's sampling schedule: ``num_steps`` shifted sigmas from 1 down to 0 (``num_steps + 1`` values)."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    lin = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return [float(shift_sigma(s, shift)) for s in lin]


@torch.no_grad()
def euler_cfg_states(
    net: FlowNet,
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    *,
    num_steps: int,
    shift: float,
    guidance_scale: float,
) -> Iterator[torch.Tensor]:
    """The states x_0 (= noise) … x_N (= the sample) of Wan's Euler flow solver with CFG, fp32 [B, C, F, H, W].

    ``v = v_u + g (v_c - v_u)`` (Wan's convention; ``uncond=None`` or ``g = 1``: no CFG),
    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v`` over :func:`euler_sigmas`. The net sees ``noise``'s dtype.
    """
    sigmas = euler_sigmas(num_steps, shift)
    x = noise.float()
    use_cfg = uncond is not None and guidance_scale != 1.0
    yield x
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = timestep_tensor(1000.0 * s, x)
        xin = x.to(noise.dtype)
        v = net(xin, t, **cond).float()
        if use_cfg:
            v_u = net(xin, t, **uncond).float()
            v = v_u + guidance_scale * (v - v_u)
        x = x + (s_next - s) * v
        yield x


@torch.no_grad()
def teacher_sample(
    net: FlowNet,
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    *,
    num_steps: int = 50,
    shift: float = 5.0,
    guidance_scale: float = 5.0,
) -> torch.Tensor:
    """Multi-step Euler flow sampling with classifier-free guidance (:func:`euler_cfg_states`, last state).

    Makes ``num_steps`` (no CFG) or ``2 * num_steps`` evaluations. Returns x0 [B, C, F, H, W] fp32.
    """
    # Only the last state is kept (a list of every state would hold num_steps copies of the video).
    for x in euler_cfg_states(net, noise, cond, uncond, num_steps=num_steps, shift=shift,  # noqa: B007
                              guidance_scale=guidance_scale):
        pass
    return x
