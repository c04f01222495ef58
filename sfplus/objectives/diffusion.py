"""Flow-matching diffusion loss (teacher training, fine-tuning, teacher forcing),
docs/algorithms.md, 'Causal diffusion (teacher forcing)'."""

from __future__ import annotations

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, training_weight


def flow_matching_loss(
    net: FlowNet,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Cond,
    *,
    weighting_shift: float | None = None,
) -> torch.Tensor:
    """``mean((net(x_t, t) - (eps - x0))^2)``, optionally weighted per sample/frame by the reference's bell curve.

    Args:
        x0: clean latents [B, C, F, H, W]; t: [B] or [B, F]; eps: noise like ``x0``.
        weighting_shift: if given, weight by :func:`sfplus.flow.training_weight` at that shift.
    """
    x_t = add_noise(x0, eps, t)
    v = net(x_t, t, **cond).float()
    err = (v - (eps.float() - x0.float())) ** 2  # [B, C, F, H, W]
    if weighting_shift is None:
        return err.mean()
    per_frame = err.mean(dim=(1, 3, 4))  # [B, F]
    w = training_weight(t.float(), weighting_shift)
    w = w.view(-1, 1) if w.dim() == 1 else w
    return (per_frame * w).mean()
