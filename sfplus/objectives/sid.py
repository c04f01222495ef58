"""Score identity Distillation (SiD) generator loss, docs/algorithms.md, 'SiD'.

Given a generated sample ``x`` (carrying grad to the generator), noise it to ``x_t`` *with* the graph, and let the fake
score ``f`` and the CFG real score ``r = r_c + s (r_c - r_u)`` (DMD's convention, docs/algorithms.md, 'CFG conventions')
denoise it:

    L = mean( nan_to_num( (r - f) * ((r - x) - alpha (r - f)) / sg(mean_{C,F,H,W} |x - r|) ) )

computed elementwise in float64. Unlike DMD nothing runs under ``no_grad``: the gradient reaches ``x`` directly and
through both score networks' inputs. The score networks' *parameters* are on that graph too — freeze them
(``requires_grad_(False)``) for the generator step, or discard their gradients before the critic step, as the
reference does with ``zero_grad(set_to_none=True)``.

The loss needs only ``x``, so it works for any generator (bidirectional or block-causal rollouts alike); the
reference's SiD cannot run at all (B6 in docs/algorithms.md, 'Reference bugs'). The critic (fake score) loss is DMD's
:func:`sfplus.objectives.dmd.critic_flow_loss`.
"""

from __future__ import annotations

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, predict_x0
from sfplus.objectives.dmd import real_score_cfg


def sid_loss_from_scores(
    x: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    *,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SiD formula on given x0 estimates (all [B, C, F, H, W]); float64 scalar loss and detached logs.

    mask: optional boolean [B, C, F, H, W]; the loss is averaged over its True elements (the per-sample
    normaliser always uses the whole sample, as DMD's).
    """
    if not (x.shape == fake_x0.shape == real_x0.shape):
        raise ValueError(f"x {tuple(x.shape)}, fake x0 {tuple(fake_x0.shape)} and real x0 {tuple(real_x0.shape)} "
                         "must have the same [B, C, F, H, W] shape")
    x64, f, r = x.double(), fake_x0.double(), real_x0.double()
    gap = r - f
    elem = gap * ((r - x64) - alpha * gap)
    norm = (x64 - r).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).detach()
    # A sample with r == x exactly has a zero normaliser; the reference's nan_to_num would turn its inf into
    # float64's max (overflowing the mean) and its gradient is nan. Dividing by inf instead zeroes its
    # contribution and its gradient; nan_to_num still guards against non-finite scores.
    safe = torch.where(norm > 0, norm, torch.full_like(norm, float("inf")))
    elem = torch.nan_to_num(elem / safe)
    loss = elem[mask].mean() if mask is not None else elem.mean()
    logs = {
        "sid_score_gap": gap.detach().abs().mean(),  # mean |r - f|: how far the critic is from the teacher
        "sid_normaliser": norm.mean(),
    }
    return loss, logs


def sid_generator_loss(
    x: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    fake: FlowNet,
    real: FlowNet,
    cond: Cond,
    uncond: Cond,
    real_guidance_scale: float,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SiD generator loss (docs/algorithms.md, 'SiD'); differentiable w.r.t. ``x`` (directly and through both score
    nets).

    Args:
        x: generated clean sample [B, C, F, H, W] (with the generator's graph).
        t: score timesteps [B, F] (or [B]), e.g. from :func:`sfplus.flow.sample_score_timesteps`.
        eps: noise like ``x``.
        fake, real: flow nets ``net(x_t, t, **cond) -> v``; the fake score is used without guidance.
        cond, uncond: conditional / unconditional (negative prompt) keyword arguments of the nets.
        real_guidance_scale: ``s`` in ``r_c + s (r_c - r_u)`` (Wan-style CFG ``s + 1``).
        alpha: SiD's alpha (``sid_alpha``, 1.0 in the reference).
        mask: optional boolean [B, C, F, H, W] restricting the mean (e.g. long-rollout first-block exclusion).
    Returns: (float64 scalar loss, logs of detached scalars).
    """
    x_t = add_noise(x, eps, t)  # keeps the graph to x
    f = predict_x0(fake, x_t, t, cond)
    r = real_score_cfg(real, x_t, t, cond, uncond, real_guidance_scale)
    return sid_loss_from_scores(x, f, r, alpha=alpha, mask=mask)
