"""Adversarial (GAN) terms on a critic WanDiT + :class:`sfplus.nets.discriminator.DiscriminatorHead`,
docs/algorithms.md, 'GAN term (DMD2)'.

The discriminator ``D`` is the critic's trunk read after a few blocks by the head. Real (data) and fake (generated)
latents are noised to the same score timestep ``t`` before ``D``: in the critic step with the same ``eps``, in the
(relativistic) generator step the real latents with a fresh draw of their own, as the reference does.

* non-saturating: generator ``softplus(-D(fake))``; discriminator ``softplus(-D(real)) + softplus(D(fake))``;
* relativistic: generator ``softplus(-(D(fake) - D(real)))``; discriminator ``softplus(-(D(real) - D(fake)))``;
* finite-difference R1 (real) / R2 (fake): ``mean(((D(x_t + s n) - D(x_t)) / s)^2)``, ``n ~ N(0, I)``;
* critic objective ``gan_d_weight * L_D + 0.5 (r1_weight * R1 + r2_weight * R2)``; generator term
  ``gan_g_weight * L_G``.

The reference additionally scales by ``loss_ratio``/``loss_scale`` (its batch bookkeeping); multiply outside if
needed. Freezing is the caller's job: critic and head parameters are on the generator term's graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import add_noise, randn_like
from sfplus.nets.discriminator import DiscriminatorHead


def discriminator_logits(
    critic: torch.nn.Module,
    head: DiscriminatorHead,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
    blocks: Sequence[int],
    *,
    return_flow: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits [B] of noisy latents ``x_t`` [B, C, F, H, W] at timesteps ``t`` ([B] or [B, F]).

    Runs ``critic(x_t, t, **cond, return_hidden=blocks)`` (a WanDiT) and the head on the hidden states of
    ``blocks`` (in that order). With ``return_flow`` also returns the critic's flow prediction, so a flow-matching
    critic loss can share the same forward.
    """
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != head.num_blocks:
        raise ValueError(f"{len(blocks)} critic blocks {blocks} given for a head reading {head.num_blocks}")
    flow, hidden = critic(x_t, t, **cond, return_hidden=blocks)
    logits = head([hidden[b] for b in blocks], hidden["e"] if head.time_token else None)
    return (logits, flow) if return_flow else logits


def gan_generator_loss(
    d_fake: torch.Tensor, d_real: torch.Tensor | None = None, *, relativistic: bool = False, weight: float = 1.0
) -> torch.Tensor:
    """``weight * mean softplus(-D(fake))`` or, relativistic, ``weight * mean softplus(-(D(fake) - D(real)))``."""
    if relativistic:
        if d_real is None:
            raise ValueError("the relativistic generator loss needs D(real)")
        return weight * F.softplus(-(d_fake - d_real)).mean()
    return weight * F.softplus(-d_fake).mean()


def gan_discriminator_loss(
    d_real: torch.Tensor, d_fake: torch.Tensor, *, relativistic: bool = False, weight: float = 1.0
) -> torch.Tensor:
    """``weight * [mean softplus(-D(real)) + mean softplus(D(fake))]`` or, relativistic,
    ``weight * mean softplus(-(D(real) - D(fake)))``."""
    if relativistic:
        return weight * F.softplus(-(d_real - d_fake)).mean()
    return weight * (F.softplus(-d_real).mean() + F.softplus(d_fake).mean())


def finite_difference_penalty(
    d_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    *,
    d_x: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator=None,
) -> torch.Tensor:
    """``mean(((D(x + sigma n) - D(x)) / sigma)^2)`` with ``n ~ N(0, I)`` like ``x``: a gradient-norm penalty
    without double backprop (its expectation is ``|grad D|^2`` for small sigma).

    d_fn: ``x -> logits [B]``; d_x: ``D(x)`` if already computed; noise: ``n`` (drawn from ``generator`` if None).
    """
    if sigma <= 0:
        raise ValueError(f"finite-difference sigma must be > 0, got {sigma}")
    if noise is None:
        noise = randn_like(x, generator)
    if d_x is None:
        d_x = d_fn(x)
    d_pert = d_fn(x + sigma * noise)
    return (((d_pert.float() - d_x.float()) / sigma) ** 2).mean()


def _repeat_cond(cond: Cond, times: int) -> Cond:
    """Each conditioning tensor repeated ``times`` along the batch axis (for batched real/fake forwards)."""
    return {k: torch.cat([v] * times, dim=0) for k, v in cond.items()}


def gan_critic_loss(
    critic: torch.nn.Module,
    head: DiscriminatorHead,
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Cond,
    blocks: Sequence[int],
    *,
    relativistic: bool = False,
    gan_d_weight: float = 1e-2,
    r1_weight: float = 0.0,
    r2_weight: float = 0.0,
    r1_sigma: float = 0.01,
    r2_sigma: float = 0.01,
    generator=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic-side GAN objective ``gan_d_weight * L_D + 0.5 (r1_weight * R1 + r2_weight * R2)``.

    x_real: data latents; x_fake: generated latents (detached here), both [B, C, F, H, W]; both are noised with the
    same ``t`` ([B, F]) and ``eps`` and go through the critic as one batch of 2B. The penalties' perturbed inputs
    (only those with a non-zero weight) form a second batched forward.
    Returns: (scalar loss, detached logs: mean logits, L_D, R1, R2).
    """
    if x_real.shape != x_fake.shape:
        raise ValueError(f"real {tuple(x_real.shape)} and fake {tuple(x_fake.shape)} latents differ in shape")
    b = x_real.shape[0]
    x_t = torch.cat([add_noise(x_real.detach(), eps, t), add_noise(x_fake.detach(), eps, t)], dim=0)

    def d_fn(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // b
        return discriminator_logits(critic, head, x, torch.cat([t] * n, dim=0), _repeat_cond(cond, n), blocks)

    logits = d_fn(x_t)
    d_real, d_fake = logits[:b], logits[b:]
    loss_d = gan_discriminator_loss(d_real, d_fake, relativistic=relativistic, weight=gan_d_weight)
    logs = {"d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean(),
            "loss_d": loss_d.detach()}
    total = loss_d

    # Finite-difference penalties: perturb the needed halves and run them as one batch.
    parts = [(name, w, s, x_t[sl], logits[sl]) for name, w, s, sl in
             (("r1", r1_weight, r1_sigma, slice(0, b)), ("r2", r2_weight, r2_sigma, slice(b, 2 * b))) if w]
    if parts:
        for _, _, s, _, _ in parts:
            if s <= 0:
                raise ValueError(f"finite-difference sigma must be > 0, got {s}")
        noises = [randn_like(x, generator) for _, _, _, x, _ in parts]
        perturbed = torch.cat([x + s * n for (_, _, s, x, _), n in zip(parts, noises)], dim=0)
        d_pert = d_fn(perturbed)
        for i, (name, w, s, _, d_x) in enumerate(parts):
            pen = (((d_pert[i * b:(i + 1) * b].float() - d_x.float()) / s) ** 2).mean()
            logs[name] = pen.detach()
            total = total + 0.5 * w * pen
    return total, logs


def gan_generator_term(
    critic: torch.nn.Module,
    head: DiscriminatorHead,
    x_fake: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Cond,
    blocks: Sequence[int],
    *,
    x_real: torch.Tensor | None = None,
    eps_real: torch.Tensor | None = None,
    relativistic: bool = False,
    gan_g_weight: float = 1e-2,
    generator=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Generator-side GAN loss ``gan_g_weight * L_G``; differentiable w.r.t. ``x_fake`` through the critic.

    x_fake: generated latents (with the generator's graph), noised with ``t`` and ``eps``; x_real: data latents,
    needed when relativistic (its logits are computed without grad), noised with ``t`` and ``eps_real``: noise
    independent of ``eps`` (the reference draws it fresh; None: drawn here from ``generator``, a torch generator or
    :class:`sfplus.noise.SampleNoise`). The non-relativistic loss reads no real latents and draws nothing.
    Returns: (scalar loss, detached logs).
    """
    d_fake = discriminator_logits(critic, head, add_noise(x_fake, eps, t), t, cond, blocks)
    d_real = None
    logs = {"d_fake": d_fake.detach().float().mean()}
    if relativistic:
        if x_real is None:
            raise ValueError("the relativistic generator loss needs real latents (x_real)")
        if eps_real is None:
            eps_real = randn_like(x_real, generator)
        with torch.no_grad():
            d_real = discriminator_logits(critic, head, add_noise(x_real, eps_real, t), t, cond, blocks)
        logs["d_real"] = d_real.float().mean()
    loss = gan_generator_loss(d_fake, d_real, relativistic=relativistic, weight=gan_g_weight)
    logs["loss_g"] = loss.detach()
    return loss, logs
