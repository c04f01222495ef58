"""Distribution Matching Distillation (DMD / DMD2), docs/algorithms.md, 'DMD'.

Pure functions of tensors and nets. Given a generated sample ``x`` (carrying grad to the generator):

* the KL gradient ``g = (f - r) / mean|x - r|`` with the fake score ``f`` and the CFG real score
  ``r = r_c + s (r_c - r_u)`` (the reference's convention: scale ``s`` is Wan's ``s + 1``), all in x0 space;
* the generator loss ``0.5 * mean((x - sg(x - g))^2)`` whose gradient w.r.t. ``x`` is ``g / N``;
* the critic (fake score) loss: flow matching on detached generated samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, predict_x0, x0_to_flow


@dataclass
class KLGrad:
    """The DMD gradient and what to log about it."""

    grad: torch.Tensor  # [B, C, F, H, W] fp32, normalised
    gradient_norm: torch.Tensor  # scalar: mean |grad|
    real_x0: torch.Tensor  # [B, C, F, H, W] CFG real-score x0


def real_score_cfg(
    real: FlowNet, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, guidance_scale: float
) -> torch.Tensor:
    """Real (teacher) score x0 with the reference's CFG: ``r_c + s (r_c - r_u)``."""
    r_c = predict_x0(real, x_t, t, cond)
    if guidance_scale == 0:
        return r_c
    r_u = predict_x0(real, x_t, t, uncond)
    return r_c + guidance_scale * (r_c - r_u)


@torch.no_grad()
def dmd_kl_grad(
    x: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    fake: FlowNet,
    real: FlowNet,
    cond: Cond,
    uncond: Cond,
    real_guidance_scale: float,
    fake_guidance_scale: float = 0.0,
) -> KLGrad:
    """DMD eq. 7–8: ``grad = (f - r) / mean_{C,F,H,W} |x - r|`` per sample (no graph).

    Args:
        x: generated clean sample [B, C, F, H, W].
        t: score timesteps [B, F]; eps: noise like ``x``.
    """
    x = x.detach()
    x_t = add_noise(x, eps, t)
    f = predict_x0(fake, x_t, t, cond)
    if fake_guidance_scale != 0:
        f = f + fake_guidance_scale * (f - predict_x0(fake, x_t, t, uncond))
    r = real_score_cfg(real, x_t, t, cond, uncond, real_guidance_scale)
    grad = f - r
    norm = (x.float() - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = torch.nan_to_num(grad / norm)
    return KLGrad(grad, grad.abs().mean(), r)


def dmd_generator_loss(x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``0.5 * mean((x - sg(x - grad))^2)`` in float64 (over masked elements when ``mask`` is given).

    Its gradient w.r.t. ``x`` is ``grad / N`` and its value ``0.5 * mean(grad^2)``.
    """
    x64 = x.double()
    target = (x64 - grad.double()).detach()
    sq = (x64 - target) ** 2
    if mask is not None:
        return 0.5 * sq[mask].mean()
    return 0.5 * sq.mean()


def critic_flow_loss(
    fake: FlowNet, x_gen: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Cond
) -> torch.Tensor:
    """Fake-score loss (docs/algorithms.md, 'DMD', critic): ``mean((v_fake - (eps - x_gen))^2)``.

    ``x_gen`` is detached; the fake score sees the conditional prompt only.
    """
    x_gen = x_gen.detach()
    x_t = add_noise(x_gen, eps, t)
    x0_fake = predict_x0(fake, x_t, t, cond)
    v_fake = x0_to_flow(x_t, x0_fake, t)
    return ((v_fake - (eps.float() - x_gen.float())) ** 2).mean()
