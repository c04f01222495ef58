"""Flow-matching maths in continuous time.

Conventions (shared by the teacher, the critic and the generator):

* ``t`` is a timestep on the 0..1000 scale and ``sigma = t / 1000`` exactly (no grid lookup);
* ``x_t = (1 - sigma) * x0 + sigma * eps``; the nets predict the flow ``v = eps - x0``;
* video tensors are ``[B, C, F, H, W]``; timesteps are ``[B]`` (one per sample) or ``[B, F]`` (one per frame).

The reference looks sigma up on a 1000-point grid whose shift differs between its nets (docs/algorithms.md, 'Reference
bugs', B5); the continuous relation reproduces the grid values exactly and is the same for every net.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from sfplus.noise import SampleNoise

if TYPE_CHECKING:  # annotations only: flow maths must not import the conditioning package (encoders, image I/O)
    from sfplus.conditioning.conditioner import Cond

NUM_TRAIN_TIMESTEPS = 1000.0


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """Noise level of timestep ``t`` (any shape): ``t / 1000``."""
    return t / NUM_TRAIN_TIMESTEPS


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Wan/SD3 timestep shift: ``s * sigma / (1 + (s - 1) * sigma)``; ``shift = 1`` is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def warp_timesteps(steps: Sequence[float], shift: float) -> list[float]:
    """Map an unshifted step list through the shift, as the reference's ``warp_denoising_step``.

    ``[1000, 750, 500, 250]`` at shift 5 becomes ``[1000, 937.5, 833.33, 625]``; 0 stays 0.
    """
    out = []
    for k in steps:
        if not 0 <= k <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"denoising step {k} is outside [0, 1000]")
        out.append(float(NUM_TRAIN_TIMESTEPS * shift_sigma(k / NUM_TRAIN_TIMESTEPS, shift)))
    return out


def unwarp_timestep(t: float, shift: float) -> float:
    """Inverse of :func:`warp_timesteps` for one value (used for ``ts_schedule`` bounds)."""
    s = t / NUM_TRAIN_TIMESTEPS
    return float(NUM_TRAIN_TIMESTEPS * s / (shift - (shift - 1) * s))


def expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast timesteps ``[B]`` or ``[B, F]`` against a video ``x`` ``[B, C, F, H, W]`` → ``[B, 1, F|1, 1, 1]``."""
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.dim() == 1:
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps {tuple(t.shape)} do not match batch of {tuple(x.shape)}")
        return t.view(-1, 1, 1, 1, 1)
    if t.dim() == 2:
        if t.shape[0] != x.shape[0] or t.shape[1] != x.shape[2]:
            raise ValueError(f"per-frame timesteps {tuple(t.shape)} do not match video {tuple(x.shape)}")
        return t.view(t.shape[0], 1, t.shape[1], 1, 1)
    raise ValueError(f"timesteps must be [B] or [B, F], got {tuple(t.shape)}")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma eps`` computed in fp32 and returned in ``x0``'s dtype."""
    s = sigma_of(expand_t(t, x0).float())
    return ((1 - s) * x0.float() + s * eps.float()).to(x0.dtype)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean estimate from a flow prediction: ``x0 = x_t - sigma * v`` (fp32)."""
    s = sigma_of(expand_t(t, x_t).float())
    return x_t.float() - s * flow.float()


def x0_to_flow(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow implied by a clean estimate: ``v = (x_t - x0) / sigma`` (fp32; ``t`` must be > 0)."""
    s = sigma_of(expand_t(t, x_t).float())
    return (x_t.float() - x0.float()) / s


def sample_score_timesteps(
    batch: int,
    frames: int,
    *,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    min_t: int = 0,
    max_t: int = 1000,
    clamp: tuple[float, float] = (20.0, 980.0),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Timesteps for the score networks (DMD/SiD/critic), docs/algorithms.md, 'Score timesteps'.

    One integer ``t_raw ~ U{min_t, ..., max_t - 1}`` per sample, shared by its frames, shifted (if ``shift > 1``)
    and clamped to ``[20, 980]``. Returns float ``[B, F]`` on ``device``.
    """
    if max_t <= min_t:
        raise ValueError(f"empty timestep range [{min_t}, {max_t})")
    t_raw = torch.randint(min_t, max_t, (batch,), generator=generator, device="cpu")
    return score_timesteps_from_raw(t_raw, frames, shift=shift, clamp=clamp).to(device)


def score_timesteps_from_raw(
    t_raw: torch.Tensor, frames: int, *, shift: float = 1.0, clamp: tuple[float, float] = (20.0, 980.0)
) -> torch.Tensor:
    """Shift (if ``shift > 1``) and clamp raw integer timesteps ``[B]``; repeat over frames → float ``[B, F]``."""
    t = t_raw.double()
    if shift > 1:
        t = NUM_TRAIN_TIMESTEPS * shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift)
    t = t.clamp(*clamp).float()
    return t.view(-1, 1).expand(t.shape[0], frames).contiguous()


def sample_training_timesteps(
    batch: int,
    *,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Diffusion-training timesteps ``[B]``: sigma ~ U(0, 1) pushed through the shift, times 1000.

    Drawn in (0, 1] so that ``sigma > 0`` (the flow ↔ x0 conversions divide by sigma).
    """
    u = 1.0 - torch.rand(batch, generator=generator, device="cpu", dtype=torch.float64)
    return (NUM_TRAIN_TIMESTEPS * shift_sigma(u, shift)).float().to(device)


def training_weight(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Reference's bell-shaped loss weight (docs/algorithms.md, 'Flow matching'), evaluated at continuous ``t``.

    ``y = exp(-2 ((t - 500) / 1000)^2)``, minus its minimum over the shifted 1000-point grid, scaled so the mean
    over that grid is 1.
    """
    lin = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    grid = NUM_TRAIN_TIMESTEPS * shift_sigma(lin, shift)
    y_grid = torch.exp(-2 * ((grid - 500) / 1000) ** 2)
    y_min, y_sum = y_grid.min(), (y_grid - y_grid.min()).sum()
    y = torch.exp(-2 * ((t.double() - 500) / 1000) ** 2)
    return ((y - y_min) * 1000 / y_sum).to(t.dtype)


# A flow-predicting net: net(x [B,C,F,H,W], t [B] | [B,F], **cond) -> v [B,C,F,H,W].
FlowNet = Callable[..., torch.Tensor]


def predict_x0(net: FlowNet, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """x0 estimate (fp32) of ``net`` at ``(x_t, t)``."""
    return flow_to_x0(x_t, net(x_t, t, **cond), t)


def timestep_tensor(value: float, x: torch.Tensor) -> torch.Tensor:
    """A ``[B, F]`` timestep tensor filled with ``value`` for video ``x`` [B, C, F, H, W]."""
    return torch.full((x.shape[0], x.shape[2]), float(value), device=x.device, dtype=torch.float32)


def randn_like(x: torch.Tensor, generator: torch.Generator | SampleNoise | None) -> torch.Tensor:
    """Gaussian noise like ``x`` from ``generator`` (a torch generator, or per-sample streams), in ``x``'s dtype."""
    if isinstance(generator, SampleNoise):
        return generator.randn_like(x)
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)
