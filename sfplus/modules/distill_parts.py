"""The pieces a distillation step is given, built once from the recipe's settings (:class:`DistillModule`):

* a **rollout** — how the generator produces the sample a loss scores, with one return type
  (:class:`sfplus.rollout.Rollout`): :class:`BidirectionalRollout` (few-step chain, one differentiable exit step),
  :class:`SelfForcingRollout` (the causal chunk-wise rollout with a KV cache), :class:`CausVidStep` (one generator
  step from data-simulated inputs);
* a **distribution objective** — the generator's loss against the teacher (real score) and the critic (fake score):
  :class:`DMDObjective` or :class:`SiDObjective`; the critic's own loss is the flow-matching loss on the generator's
  samples for both (:func:`sfplus.objectives.dmd.critic_flow_loss`).

Each rollout is called as ``rollout(generator, cond, noise, draws, kind=..., grad=..., real=...)``: ``noise`` holds
this rank's per-sample streams, ``draws`` gives values every rank draws alike (the exit step, the rollout length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.nets.causal import BlockCausal
from sfplus.noise import SampleNoise
from sfplus.objectives.causvid import causvid_generator_output
from sfplus.objectives.dmd import dmd_generator_loss, dmd_kl_grad
from sfplus.objectives.sid import sid_generator_loss
from sfplus.rollout.bidirectional import Rollout, bidirectional_rollout
from sfplus.rollout.causal import block_layout, causal_rollout


class SharedDraws(Protocol):
    """Integers every rank draws identically for the current update (see RecipeModule.shared_randint)."""

    def shared_randint(self, kind: str, high: int) -> int: ...


@dataclass(frozen=True)
class ExitSteps:
    """Where a few-step rollout stops (the step whose output carries gradient), drawn alike on every rank.

    Args:
        steps: number of denoising steps.
        same_across_blocks: one exit step for all causal blocks (else one per block).
        last_only: always exit at the last step.
    """

    steps: int
    same_across_blocks: bool = True
    last_only: bool = False

    def draw(self, draws: SharedDraws, kind: str, blocks: int) -> list[int]:
        if self.last_only:
            return [self.steps - 1] * blocks
        if self.same_across_blocks:
            return [draws.shared_randint(kind + "-exit", self.steps)] * blocks
        return [draws.shared_randint(f"{kind}-exit-{b}", self.steps) for b in range(blocks)]


@dataclass(frozen=True)
class BidirectionalRollout:
    """The few-step chain over the whole video; the exit step's x0 carries gradient."""

    timesteps: Sequence[float]
    exits: ExitSteps
    video_shape: Sequence[int]

    def __call__(self, generator, cond: Cond, noise: SampleNoise, draws: SharedDraws, *, kind: str, grad: bool,
                 real: torch.Tensor | None = None) -> Rollout:
        x_T = noise.randn(self.video_shape).to(cond["context"].device)
        exit_index = self.exits.draw(draws, kind, 1)[0]
        return bidirectional_rollout(generator, x_T, self.timesteps, cond, exit_index, noise, grad=grad)


@dataclass(frozen=True)
class SelfForcingRollout:
    """Self-Forcing's causal rollout: block by block with a KV cache, each block's exit step carrying gradient,
    the cache refreshed with the block's clean output at timestep ``context_noise``.

    With ``max_rollout_frames`` beyond the video's frames, rollouts take a random whole number of extra blocks (alike
    on all ranks); only the last ``video_shape`` frames are scored, their first frame replaced by ``rewindow``'s
    re-encoding and masked out of the generator loss.
    """

    timesteps: Sequence[float]
    exits: ExitSteps
    video_shape: Sequence[int]
    frames_per_block: int
    independent_first_frame: bool = False
    context_noise: float = 0.0
    max_rollout_frames: int | None = None
    rewindow: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def length(self, draws: SharedDraws, kind: str, frames: int) -> int:
        """Latent frames of this update's rollout: ``frames`` plus a whole number of blocks drawn uniformly."""
        if not self.max_rollout_frames or self.max_rollout_frames <= frames:
            return frames
        extra_blocks = (self.max_rollout_frames - frames) // self.frames_per_block
        return frames + self.frames_per_block * draws.shared_randint(kind + "-length", extra_blocks + 1)

    def __call__(self, generator, cond: Cond, noise: SampleNoise, draws: SharedDraws, *, kind: str, grad: bool,
                 real: torch.Tensor | None = None) -> Rollout:
        channels, frames, *hw = self.video_shape
        device = cond["context"].device
        x_T = noise.randn(self.video_shape).to(device)
        total = self.length(draws, kind, frames)
        if total > frames:  # a longer rollout: fresh noise of its length (the draw above keeps the streams' order)
            x_T = noise.randn([channels, total, *hw]).to(device)
        layout = block_layout(total, self.frames_per_block, independent_first_frame=self.independent_first_frame)
        rollout = causal_rollout(
            generator, x_T, self.timesteps, cond, frames_per_block=self.frames_per_block,
            exit_indices=self.exits.draw(draws, kind, len(layout.generated)),
            independent_first_frame=self.independent_first_frame, context_noise=self.context_noise, generator=noise,
            grad=grad, grad_frames=frames if total > frames else None,
        )
        if total > frames:
            rollout.x0, rollout.loss_mask = self.rewindow(rollout.x0, frames)
        return rollout


@dataclass(frozen=True)
class CausVidStep:
    """CausVid's generator sample: one step from data-simulated noisy inputs (needs clean latents ``real``);
    block-causal with a KV cache when ``causal`` is given, with clean context under ``teacher_forcing``."""

    timesteps: Sequence[float]
    causal: BlockCausal | None = None
    teacher_forcing: bool = False

    def __call__(self, generator, cond: Cond, noise: SampleNoise, draws: SharedDraws, *, kind: str, grad: bool,
                 real: torch.Tensor | None = None) -> Rollout:
        with torch.set_grad_enabled(grad):
            x0 = causvid_generator_output(generator, real, self.timesteps, cond, self.causal, noise,
                                          teacher_forcing=self.teacher_forcing)
        return Rollout(x0, -1, None, None, 1)


@dataclass(frozen=True)
class DMDObjective:
    """Distribution matching: the generator follows the difference of the fake and the real (CFG) scores.

    Scales in Wan's convention (``u + g (c - u)``); the objective functions take the reference's ``c + s (c - u)``,
    ``s = g - 1`` — converted here, the one place (docs/algorithms.md, 'CFG conventions')."""

    guidance_scale: float
    critic_guidance_scale: float = 1.0

    def generator_loss(self, x, t, eps, *, fake, real, cond: Cond, uncond: Cond,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        kl = dmd_kl_grad(x, t, eps, fake=fake, real=real, cond=cond, uncond=uncond,
                         real_guidance_scale=self.guidance_scale - 1,
                         fake_guidance_scale=self.critic_guidance_scale - 1)
        return dmd_generator_loss(x, kl.grad, mask), {"dmd_gradient_norm": kl.gradient_norm}


@dataclass(frozen=True)
class SiDObjective:
    """Score identity distillation (``alpha``: SiD's weighting of the fake-score term); ``guidance_scale`` in Wan's
    convention, converted as in :class:`DMDObjective`."""

    guidance_scale: float
    alpha: float = 1.0

    def generator_loss(self, x, t, eps, *, fake, real, cond: Cond, uncond: Cond,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        return sid_generator_loss(x, t, eps, fake=fake, real=real, cond=cond, uncond=uncond,
                                  real_guidance_scale=self.guidance_scale - 1, alpha=self.alpha, mask=mask)
