"""Score distillation of a frozen teacher into a few-step generator (DMD, SiD, CausVid, + DMD2's GAN term)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from sfplus.conditioning import Conditioner, Cond
from sfplus.flow import score_timesteps_from_raw, warp_timesteps
from sfplus.modules.base import RecipeModule, _copy_weights, _default_toy_conditioner
from sfplus.noise import SampleNoise
from sfplus.objectives.dmd import critic_flow_loss, dmd_generator_loss, dmd_kl_grad
from sfplus.rollout import bidirectional_rollout
from sfplus.sampling import few_step_sample


class DistillModule(RecipeModule):
    """DMD distillation: few-step generator ← frozen teacher (CFG), with a fake-score critic.

    Args:
        net: DiT preset of the generator, critic and teacher.
        net_overrides: preset fields to change.
        conditioner: frozen encoders.
        teacher_checkpoint: weights of the teacher (a Lightning checkpoint's EMA, a Wan file, ...).
        generator_checkpoint: initial generator weights (default: the teacher's).
        critic_checkpoint: initial critic weights (default: the teacher's).
        denoising_steps: the generator's steps before warping (reference ``denoising_step_list``).
        warp_denoising_steps: map the steps through ``timestep_shift`` ([1000,750,500,250] → [1000,937.5,833.3,625]).
        timestep_shift: shift of the score timesteps and of the step warp (5.0 in every reference config).
        real_guidance_scale: teacher CFG in the reference's convention (effective Wan scale = this + 1).
        fake_guidance_scale: CFG of the fake score (0: none).
        min_score_timestep: lower bound of the raw score timestep.
        ts_schedule / ts_schedule_max: bound the score timestep by the exit step's noise levels (reference §4.2).
        dfake_gen_update_ratio: a generator update every this many iterations.
        generator_lr, critic_lr, betas, critic_betas, weight_decay: AdamW settings (reference defaults).
        max_grad_norm_generator, max_grad_norm_critic: per-optimizer clipping.
        video_shape: latent shape ``[C, F, H, W]`` of generated videos.
        predict_weights: ``ema`` (falls back to the raw generator before EMA starts) or ``generator``.
        seed: base seed of training randomness; predict_seed: base seed of generated videos.
        scale: ``{activation_checkpointing: bool, param_dtype: bf16|fp32 (FSDP compute dtype),
            frozen_dtype: bf16|fp32|None (teacher storage)}`` (see sfplus.parallel).
    """

    frozen_prefixes = ("teacher.", "conditioner.")

    def __init__(
        self,
        net: str = "toy",
        net_overrides: dict | None = None,
        conditioner: Conditioner | None = None,
        teacher_checkpoint: str | None = None,
        generator_checkpoint: str | None = None,
        critic_checkpoint: str | None = None,
        denoising_steps: list[float] | None = None,
        warp_denoising_steps: bool = True,
        timestep_shift: float = 5.0,
        real_guidance_scale: float = 3.0,
        fake_guidance_scale: float = 0.0,
        min_score_timestep: int = 0,
        ts_schedule: bool = False,
        ts_schedule_max: bool = False,
        dfake_gen_update_ratio: int = 5,
        generator_lr: float = 2e-6,
        critic_lr: float = 4e-7,
        betas: tuple[float, float] = (0.0, 0.999),
        critic_betas: tuple[float, float] = (0.0, 0.999),
        weight_decay: float = 0.01,
        max_grad_norm_generator: float = 10.0,
        max_grad_norm_critic: float = 10.0,
        video_shape: list[int] | None = None,
        predict_weights: Literal["ema", "generator"] = "ema",
        seed: int = 0,
        predict_seed: int = 0,
        scale: dict | None = None,
    ) -> None:
        super().__init__(net, net_overrides, conditioner or _default_toy_conditioner(), seed, scale)
        if dfake_gen_update_ratio < 1:
            raise ValueError(f"dfake_gen_update_ratio must be >= 1, got {dfake_gen_update_ratio}")
        self.teacher_checkpoint = teacher_checkpoint
        self.generator_checkpoint, self.critic_checkpoint = generator_checkpoint, critic_checkpoint
        steps = list(denoising_steps or [1000, 750, 500, 250])
        steps = [s for s in steps if s > 0]
        self.timesteps = warp_timesteps(steps, timestep_shift) if warp_denoising_steps else [float(s) for s in steps]
        self.unwarped_steps = steps
        self.timestep_shift = timestep_shift
        self.real_guidance_scale, self.fake_guidance_scale = real_guidance_scale, fake_guidance_scale
        self.min_score_timestep, self.ts_schedule, self.ts_schedule_max = min_score_timestep, ts_schedule, ts_schedule_max
        self.ratio = dfake_gen_update_ratio
        self.generator_lr, self.critic_lr = generator_lr, critic_lr
        self.betas, self.critic_betas, self.weight_decay = tuple(betas), tuple(critic_betas), weight_decay
        self.max_grad_norm_generator, self.max_grad_norm_critic = max_grad_norm_generator, max_grad_norm_critic
        self.video_shape = list(video_shape or [3, 4, 16, 16])
        self.predict_weights, self.predict_seed = predict_weights, predict_seed
        self.generator_steps = 0
        self.critic_steps = 0
        self.ema_started = False
        self.generator: nn.Module | None = None
        self.generator_ema: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.teacher: nn.Module | None = None

    def configure_model(self) -> None:
        if self.generator is not None:
            return
        with self.net_context():
            self.teacher = self.build_net()
            self.generator = self.build_net()
            self.critic = self.build_net()
            self.generator_ema = self.build_net()
        self.prepare_nets([self.generator, self.critic], [self.teacher], [self.generator_ema])
        if not self._weights_pending:
            self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Teacher from its file; generator and critic from theirs, or from the teacher's (reference default)."""
        from sfplus.parallel import load_weights

        if self.teacher_checkpoint:
            load_weights(self.teacher, self.teacher_checkpoint)
        for net, path in ((self.generator, self.generator_checkpoint), (self.critic, self.critic_checkpoint)):
            path = path or self.teacher_checkpoint
            if path:
                load_weights(net, path)  # from the file: a bf16 teacher must not round the trainable nets
            else:
                _copy_weights(net, self.teacher)
        _copy_weights(self.generator_ema, self.generator)

    def configure_optimizers(self):
        g = torch.optim.AdamW(self.generator.parameters(), lr=self.generator_lr, betas=self.betas, weight_decay=self.weight_decay)
        c = torch.optim.AdamW(self.critic.parameters(), lr=self.critic_lr, betas=self.critic_betas, weight_decay=self.weight_decay)
        return [g, c]

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "generator_steps": self.generator_steps, "critic_steps": self.critic_steps,
                "ema_started": int(self.ema_started)}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.generator_ema, self.generator)]

    def generator_due(self) -> bool:
        """A generator update is due at iterations 0, r, 2r, ... before that iteration's critic update."""
        return self.iteration % self.ratio == 0 and self.generator_steps <= self.iteration // self.ratio

    # ---- one update per batch ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        prompts = list(batch["prompts"])
        cond = self.conditioner.text(prompts, self.device)
        uncond = self.conditioner.negative(len(prompts), self.device)
        if self.generator_due():
            self._generator_update(cond, uncond)
        else:
            self._critic_update(cond)

    def _score_timesteps(self, f: int, rollout, noise: SampleNoise) -> torch.Tensor:
        """Score timesteps [B, F] (reference §4.2): raw integer in [min, max), shift, clamp to [20, 980]."""
        from sfplus.flow import unwarp_timestep

        min_t, max_t = self.min_score_timestep, 1000
        if self.ts_schedule and rollout.t_to is not None:
            min_t = int(round(unwarp_timestep(rollout.t_to, self.timestep_shift)))
        if self.ts_schedule_max and rollout.t_from is not None:
            max_t = int(round(unwarp_timestep(rollout.t_from, self.timestep_shift)))
        t_raw = noise.randint(min_t, max(max_t, min_t + 1))
        return score_timesteps_from_raw(t_raw, f, shift=self.timestep_shift).to(self.device)

    def _rollout(self, cond: Cond, grad: bool, kind: str):
        b = cond["context"].shape[0]
        noise = self.sample_noise(kind, b)
        exit_index = self.shared_randint(kind + "-exit", len(self.timesteps))
        x_T = noise.randn(self.video_shape).to(self.device)
        return bidirectional_rollout(self.generator, x_T, self.timesteps, cond, exit_index, noise, grad=grad), noise

    def _generator_update(self, cond: Cond, uncond: Cond) -> None:
        g_opt, _ = self.optimizers()
        with self.toggled_optimizer(g_opt):
            rollout, g = self._rollout(cond, grad=True, kind="gen")
            x = rollout.x0
            t = self._score_timesteps(x.shape[2], rollout, g)
            kl = dmd_kl_grad(
                x, t, g.randn_like(x), fake=self.critic, real=self.teacher, cond=cond, uncond=uncond,
                real_guidance_scale=self.real_guidance_scale, fake_guidance_scale=self.fake_guidance_scale,
            )
            loss = dmd_generator_loss(x, kl.grad)
            g_opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.max_grad_norm_generator)
            g_opt.step()
        self.generator_steps += 1
        self.last_update = "generator"
        self.log_dict({
            "train/generator_loss": loss.detach().float(), "train/generator_grad_norm": grad_norm,
            "train/dmd_gradient_norm": kl.gradient_norm, "train/exit_step": float(rollout.exit_index),
            "train/generator_steps": float(self.generator_steps),
        }, prog_bar=False)

    def _critic_update(self, cond: Cond) -> None:
        _, c_opt = self.optimizers()
        with torch.no_grad():
            rollout, g = self._rollout(cond, grad=False, kind="critic")
        x = rollout.x0
        t = self._score_timesteps(x.shape[2], rollout, g)
        loss = critic_flow_loss(self.critic, x, t, g.randn_like(x), cond)
        c_opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.max_grad_norm_critic)
        c_opt.step()
        self.critic_steps += 1
        self.iteration += 1
        self.last_update = "critic"
        self.log_dict({
            "train/critic_loss": loss.detach(), "train/critic_grad_norm": grad_norm,
            "train/critic_timestep": t.float().mean(), "train/iteration": float(self.iteration),
        }, prog_bar=True)

    # ---- generation -------------------------------------------------------------------------------------------
    def sampling_net(self) -> nn.Module:
        if self.predict_weights == "ema" and self.ema_started:
            return self.generator_ema
        return self.generator

    def sample(self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator) -> torch.Tensor:
        return few_step_sample(self.sampling_net(), noise, self.timesteps, cond, generator)

    def sampler_description(self) -> dict[str, Any]:
        weights = "ema" if (self.predict_weights == "ema" and self.ema_started) else "generator"
        return {"kind": "few-step", "timesteps": self.timesteps, "weights": weights}


