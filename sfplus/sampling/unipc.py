"""UniPC multistep sampler for flow-matching nets (B(h) = bh2 variant, data prediction), as Wan samples its teachers.

Written from the UniPC algorithm (Zhao et al., 2023, "UniPC: a unified predictor-corrector framework for fast
sampling of diffusion models") for the rectified-flow path ``x_t = (1 - sigma) x0 + sigma eps``:
alpha = 1 - sigma, half-log-SNR ``lambda = log(alpha / sigma)``; the net's flow ``v`` gives the data prediction
``m = x - sigma v``. It reproduces diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=shift, solver_type="bh2", lower_order_final=True)`` and the official Wan sampler
``FlowUniPCMultistepScheduler`` (docs/algorithms.md, 'Teacher sampler (Euler / UniPC)'), which differ only in
the sigma schedule (`unipc_sigmas`).

One step from sigma_s to sigma_t (h = lambda_t - lambda_s > 0, phi = expm1(-h) = B(h)):

* corrector (UniC, from the second step on): the new prediction ``m_s`` refines the sample just reached, re-doing
  the previous update with ``m_s`` as an extra point — no extra net call;
* predictor (UniP): ``x_t = (sigma_t / sigma_s) x_s - alpha_t phi m_s - alpha_t phi sum_k rho_k D_k`` with
  ``D_k = (m_{s-k} - m_s) / r_k`` from earlier predictions, ``r_k = (lambda_{s-k} - lambda_s) / h``.

The order ramps up from 1 (warm-up) and goes back to 1 at the last step, which lands on sigma = 0 where the update is
exactly the x0 prediction. Coefficients are computed in float64, tensors in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, timestep_tensor

__all__ = ["FlowUniPC", "unipc_sample", "unipc_sigmas"]

SCHEDULES = ("wan", "diffusers")


def unipc_sigmas(num_steps: int, shift: float, schedule: str = "wan") -> list[float]:
    """The ``num_steps + 1`` sigmas (shifted, decreasing, last = 0) of a UniPC run.

    ``"wan"`` (official Wan ``FlowUniPCMultistepScheduler``): ``linspace(0.999, 0, N + 1)[:-1]`` with 0.999 rounded
    to float32 as Wan computes it. ``"diffusers"`` (``UniPCMultistepScheduler`` with flow sigmas):
    ``linspace(1, 1/1000, N + 1)[:-1]``, the first shifted value (exactly 1) lowered by 1e-6 to keep lambda finite.
    Both then apply the shift ``s σ / (1 + (s - 1) σ)`` and append 0. numpy float64, as the references.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if schedule == "wan":
        sig = np.linspace(float(np.float32(1.0 - 1.0 / 1000)), 0.0, num_steps + 1)[:-1]
    elif schedule == "diffusers":
        sig = np.linspace(1.0, 1.0 / 1000, num_steps + 1)[:-1]
    else:
        raise ValueError(f"unknown UniPC schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    sig = shift * sig / (1 + (shift - 1) * sig)
    if schedule == "diffusers" and abs(sig[0] - 1) < 1e-6:
        sig[0] -= 1e-6
    return [float(s) for s in sig] + [0.0]


def _lam(sigma: float) -> float:
    """Half-log-SNR of the flow path: log((1 - sigma) / sigma)."""
    return math.log(1.0 - sigma) - math.log(sigma)


def _b_vector(hh: float, phi: float, order: int) -> list[float]:
    """b_j = g_j · j! / B(h), g_1 = phi / hh - 1, g_{j+1} = g_j / hh - 1 / (j+1)!  (j = 1..order), with hh = -h."""
    out, g, fact = [], phi / hh - 1.0, 1.0
    for j in range(1, order + 1):
        out.append(g * fact / phi)
        fact *= j + 1
        g = g / hh - 1.0 / fact
    return out


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rho with sum_k rho_k r_k^(j-1) = b_j for j = 1..len(rks) (Vandermonde system, float64)."""
    n = len(rks)
    R = torch.tensor([[r ** (j - 1) for r in rks] for j in range(1, n + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b[:n], dtype=torch.float64)).tolist()


class FlowUniPC:
    """Stateful UniPC stepper over one sigma schedule: call `step(flow, x)` once per entry of `timesteps`.

    Args:
        num_steps: number of net evaluations (per CFG branch).
        shift: the flow shift (Wan: 5.0 T2V, 3.0 I2V 480p; the README recommends 8–12 for T2V-1.3B).
        order: solver order (2 = Wan's default; any order >= 1).
        schedule: "wan" or "diffusers" (see `unipc_sigmas`).
    Attributes:
        sigmas: ``num_steps + 1`` floats, last 0.
        timesteps: the net's timestep per step, ``int(1000 · sigma)`` as Wan and diffusers feed it (truncated).
    """

    def __init__(self, num_steps: int, shift: float, *, order: int = 2, schedule: str = "wan") -> None:
        if order < 1:
            raise ValueError(f"UniPC order must be >= 1, got {order}")
        self.sigmas = unipc_sigmas(num_steps, shift, schedule)
        self.timesteps = [float(int(1000.0 * s)) for s in self.sigmas[:-1]]
        self.order, self.num_steps = order, num_steps
        self.index = 0
        self._preds: list[torch.Tensor] = []  # data predictions m of the latest `order` steps, newest last
        self._prev: tuple[torch.Tensor, int] | None = None  # (sample the last predictor started from, its order)

    def step(self, flow: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Advance from ``sigmas[index]`` to ``sigmas[index + 1]``; ``flow`` = net output at ``(x, timesteps[index])``.

        Returns the next sample (fp32); after the last step this is the x0 estimate.
        """
        i = self.index
        if i >= self.num_steps:
            raise RuntimeError(f"FlowUniPC already made its {self.num_steps} steps")
        x = x.float()
        m = x - self.sigmas[i] * flow.float()
        if self._prev is not None:
            x = self._correct(m)
        self._preds = (self._preds + [m])[-self.order:]
        p = min(self.order, self.num_steps - i, i + 1)  # warm-up, and first order at the end (lower_order_final)
        self._prev = (x, p)
        x_next = self._predict(x, p)
        self.index += 1
        return x_next

    def _update(self, x_s: torch.Tensor, s: int, t: int, order: int, m_t: torch.Tensor | None) -> torch.Tensor:
        """The B(h) update from step s to t using the stored predictions (newest = m_s) — predictor when ``m_t`` is
        None, else the corrector with ``m_t`` as the extra point."""
        sig_s, sig_t = self.sigmas[s], self.sigmas[t]
        m_s = self._preds[-1]
        if sig_t == 0.0:  # h = inf: the update is exactly the data prediction (only first order reaches here)
            return m_s.clone()
        lam_s = _lam(sig_s)
        h = _lam(sig_t) - lam_s
        phi = math.expm1(-h)  # = B(h) for bh2
        n_past = order - 1
        rks = [(_lam(self.sigmas[s - k]) - lam_s) / h for k in range(1, n_past + 1)]
        diffs = [(self._preds[-1 - k] - m_s) / r for k, r in zip(range(1, n_past + 1), rks)]
        alpha_t = 1.0 - sig_t
        out = (sig_t / sig_s) * x_s - (alpha_t * phi) * m_s
        if m_t is None:
            if n_past == 0:
                return out
            rho = [0.5] if n_past == 1 else _solve(rks, _b_vector(-h, phi, order))
            res = sum(r * d for r, d in zip(rho, diffs))
        else:
            rho = [0.5] if order == 1 else _solve(rks + [1.0], _b_vector(-h, phi, order))
            res = sum((r * d for r, d in zip(rho[:-1], diffs)), rho[-1] * (m_t - m_s))
        return out - (alpha_t * phi) * res

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        return self._update(x, self.index, self.index + 1, order, None)

    def _correct(self, m_new: torch.Tensor) -> torch.Tensor:
        x_prev, order = self._prev
        return self._update(x_prev, self.index - 1, self.index, order, m_new)


@torch.no_grad()
def unipc_sample(
    net: FlowNet,
    noise: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    *,
    num_steps: int,
    shift: float,
    guidance_scale: float,
    order: int = 2,
    schedule: str = "wan",
    integer_timesteps: bool = True,
) -> torch.Tensor:
    """Sample x0 [B, C, F, H, W] (fp32) from ``noise`` with UniPC and classifier-free guidance.

    CFG follows Wan: ``v = v_u + g (v_c - v_u)`` (``uncond=None`` or ``guidance_scale == 1`` disables it). Makes
    ``num_steps`` net calls, twice that with CFG. The net sees ``[B, F]`` timesteps ``int(1000 σ)`` as in Wan and
    diffusers (``integer_timesteps=False``: the exact ``1000 σ``); the solver always uses the exact sigmas.
    """
    solver = FlowUniPC(num_steps, shift, order=order, schedule=schedule)
    model_t = solver.timesteps if integer_timesteps else [1000.0 * s for s in solver.sigmas[:-1]]
    use_cfg = uncond is not None and guidance_scale != 1.0
    x = noise.float()
    for t_value in model_t:
        t = timestep_tensor(t_value, x)
        xin = x.to(noise.dtype)
        v = net(xin, t, **cond).float()
        if use_cfg:
            v_u = net(xin, t, **uncond).float()
            v = v_u + guidance_scale * (v - v_u)
        x = solver.step(v, x)
    return x
