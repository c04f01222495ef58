"""EMA of the trained net, kept as a frozen module inside the LightningModule (so it is checkpointed and can be
sharded like its source). The callback owns the schedule; the module says which pairs to average."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from sfplus.modules.contract import EMAHost
from sfplus.parallel import copy_weights, local_tensor


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * live`` on every parameter (local shards when sharded)."""
    e_params = [local_tensor(p) for p in ema.parameters()]
    l_params = [local_tensor(p).to(dtype=e.dtype) for p, e in zip(live.parameters(), e_params)]
    torch._foreach_lerp_(e_params, l_params, 1.0 - decay)


class EMA(L.Callback):
    """Exponential moving average of the generator (or of the diffusion model).

    The EMA starts as a copy of the live weights at the first eligible update at or after ``start_iteration``
    (the module's own iteration counter), then moves by ``decay`` after each update of the averaged net
    (every generator update for distillation; every update for diffusion training).

    Args:
        decay: averaging weight (reference: 0.99).
        start_iteration: first iteration at which the EMA exists (reference: 200).
        update_on: which updates advance the EMA (default: the module's ``ema_update_kind``: ``generator`` for
            DistillModule, ``model`` for DiffusionModule and ODEInitModule).
    """

    def __init__(self, decay: float = 0.99, start_iteration: int = 0, update_on: str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start_iteration, self.update_on = decay, start_iteration, update_on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(pl_module, EMAHost):
            raise TypeError(f"the EMA callback averages an EMAHost's nets (sfplus.modules.contract); "
                            f"{type(pl_module).__name__} is not one")
        want = self.update_on or pl_module.ema_update_kind
        if pl_module.last_update != want:
            return
        if pl_module.iteration < self.start_iteration:
            # Until the average starts, the EMA copy mirrors the live net, so a checkpoint's "ema" weights (what
            # export and the next recipe read) are never the stale initial ones.
            for ema, live in pl_module.ema_pairs():
                copy_weights(ema, live)  # the EMA starts as a copy of the live net
            return
        for ema, live in pl_module.ema_pairs():
            if pl_module.ema_started:
                ema_update(ema, live, self.decay)
            else:
                copy_weights(ema, live)  # the EMA starts as a copy of the live net
        pl_module.ema_started = True
        pl_module.log("train/ema_decay", self.decay)
