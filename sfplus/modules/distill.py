"""Score distillation of a frozen teacher into a few-step generator (DMD, SiD, CausVid, + DMD2's GAN term)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from sfplus.conditioning.conditioner import Cond, Conditioner
from sfplus.flow import score_timesteps_from_raw, unwarp_timestep
from sfplus.modules.base import RecipeModule, default_toy_conditioner
from sfplus.modules.distill_parts import (
    BidirectionalRollout,
    CausVidStep,
    DMDObjective,
    ExitSteps,
    SelfForcingRollout,
    SiDObjective,
)
from sfplus.modules.groups import GAN, FewStepSchedule, LoRA, Optimizer, Scale, ScoreTimesteps, as_group
from sfplus.modules.lora import build_lora_nets, check_lora_recipe, load_initial_adapters
from sfplus.nets.causal import BlockCausal
from sfplus.nets.discriminator import DiscriminatorHead
from sfplus.nets.presets import build_dit
from sfplus.noise import SampleNoise, stable_seed
from sfplus.objectives.dmd import critic_flow_loss
from sfplus.objectives.gan import gan_critic_loss, gan_generator_term
from sfplus.parallel import copy_weights, load_weights
from sfplus.rollout.bidirectional import Rollout
from sfplus.sampling.samplers import few_step_sample, teacher_sample
from sfplus.sampling.streaming import causal_generate
from sfplus.weights.checkpoints import CheckpointError

# Signature defaults (frozen: shared by every instance), also the base a partial group from a dict fills in.
GENERATOR_OPTIMIZER = Optimizer(lr=2e-6, betas=(0.0, 0.999))  # the reference's
CRITIC_OPTIMIZER = Optimizer(lr=4e-7, betas=(0.0, 0.999))


class DistillModule(RecipeModule):
    """Score distillation: few-step generator ← frozen teacher (CFG), with a fake-score critic.

    Objectives (``distribution_loss``): ``dmd``, ``sid`` (runs, unlike the reference's),
    ``causvid`` (DMD on one generator step from data-simulated inputs; needs ``latents`` in the batch).
    ``gan`` adds DMD2's adversarial term on critic features (needs ``latents`` in the batch).
    Generators: bidirectional (the 14B path), or causal when ``causal`` is set (Self-Forcing: a chunk-wise
    rollout with a KV cache; cache K/V are stored detached, so each block's loss reaches the weights only through
    that block's exit step — the clean stop-gradient reading of the reference's B22).
    The equations of each are in docs/algorithms.md ('DMD', 'SiD', 'CausVid', 'GAN term (DMD2)', 'Backward
    simulation (bidirectional rollout)', 'Causal rollout (Self-Forcing)', 'Reference bugs').

    Args:
        net: DiT preset of the generator and critic (and of the teacher unless ``teacher_net`` is given).
        net_overrides: preset fields to change.
        teacher_net, teacher_net_overrides: another preset for the teacher (e.g. a 14B teacher for a 1.3B
            generator, as the reference's Self-Forcing DMD); it must share the latent space (in/out channels).
        conditioner: frozen encoders.
        teacher_checkpoint: weights of the teacher (a Lightning checkpoint's EMA, a Wan file, ...).
        generator_checkpoint: initial generator weights (default: the teacher's).
        critic_checkpoint: initial critic weights (default: the teacher's).
        schedule: the generator's few-step timesteps (:class:`sfplus.modules.groups.FewStepSchedule`).
        guidance_scale: the teacher's (real score's) CFG scale in Wan's convention, ``u + g (c - u)``: 4.0 is the
            reference's ``real_guidance_scale: 3.0`` (docs/algorithms.md, 'CFG conventions').
        critic_guidance_scale: CFG of the critic (fake score), same convention (1.0: none; the reference's
            ``fake_guidance_scale`` + 1).
        real_guidance_scale, fake_guidance_scale: the reference's names; refused with the conversion to use.
        score_timesteps: where the scores are evaluated (:class:`sfplus.modules.groups.ScoreTimesteps`).
        dfake_gen_update_ratio: critic updates per generator update; a generator update every this many iterations.
        generator_optimizer, critic_optimizer: AdamW and clipping of each (:class:`sfplus.modules.groups.Optimizer`;
            defaults: the reference's lr 2e-6 / 4e-7, betas [0, 0.999], weight decay 0.01, clip 10).
        video_shape: latent shape ``[C, F, H, W]`` of generated videos.
        predict_weights: ``ema`` (falls back to the raw generator before EMA starts) or ``generator``.
        causal: the causal generator's block layout (:class:`sfplus.nets.causal.BlockCausal`: ``frames_per_block``,
            ``independent_first_frame``, and ``local_window_frames`` / ``sink_frames`` of the rolling KV cache for
            long sampling); None: a bidirectional generator.
        same_step_across_blocks: one exit step for all blocks (else one per block); last_step_only: always exit
            at the last step.
        context_noise: timestep of the clean-context cache refresh (0 = exactly clean: B4 in docs/algorithms.md,
            'Reference bugs').
        max_rollout_frames: causal training rollouts of a random length up to this many latent frames (whole blocks,
            shared by all ranks); beyond ``video_shape``'s frames only the last ones are scored, with their first
            frame replaced by the codec re-encoding of the last decoded frame before them and excluded from the
            generator loss (docs/algorithms.md, 'Long rollouts'). None: rollouts of exactly ``video_shape``'s frames.
        distribution_loss: ``dmd``, ``sid`` or ``causvid``; sid_alpha: SiD's alpha.
        teacher_forcing: CausVid with clean context (causal generators).
        gan: DMD2's GAN term (:class:`sfplus.modules.groups.GAN`; None: off). During its warm-up's critic updates
            only the discriminator head learns (the trunk's lr is 0) and the generator waits.
        seed: base seed of training randomness; predict_seed: base seed of generated videos.
        scale: memory and speed settings (:class:`sfplus.modules.groups.Scale`).
        lora: distil into LoRA adapters on ONE frozen base (:class:`~sfplus.modules.groups.LoRA`,
            :mod:`sfplus.modules.lora`;
            needs the ``lora`` extra): the teacher is the base with adapters off, generator and critic the base with
            their own adapter; EMA, optimizers and checkpoints hold the adapters only. ``scale.frozen_dtype`` then
            sets the base's storage dtype. None: three full nets.
    """

    frozen_prefixes = ("teacher.", "conditioner.")

    def __init__(
        self,
        net: str = "toy",
        net_overrides: dict | None = None,
        conditioner: Conditioner | None = None,
        teacher_checkpoint: str | None = None,
        teacher_net: str | None = None,
        teacher_net_overrides: dict | None = None,
        generator_checkpoint: str | None = None,
        critic_checkpoint: str | None = None,
        schedule: FewStepSchedule = FewStepSchedule(),
        guidance_scale: float = 4.0,
        critic_guidance_scale: float = 1.0,
        score_timesteps: ScoreTimesteps = ScoreTimesteps(),
        dfake_gen_update_ratio: int = 5,
        generator_optimizer: Optimizer = GENERATOR_OPTIMIZER,
        critic_optimizer: Optimizer = CRITIC_OPTIMIZER,
        video_shape: list[int] | None = None,
        predict_weights: Literal["ema", "generator"] = "ema",
        causal: BlockCausal | None = None,
        same_step_across_blocks: bool = True,
        last_step_only: bool = False,
        context_noise: float = 0.0,
        max_rollout_frames: int | None = None,
        distribution_loss: Literal["dmd", "sid", "causvid"] = "dmd",
        sid_alpha: float = 1.0,
        teacher_forcing: bool = False,
        gan: GAN | None = None,
        real_guidance_scale: float | None = None,
        fake_guidance_scale: float | None = None,
        seed: int = 0,
        predict_seed: int = 0,
        scale: Scale = Scale(),
        lora: LoRA | None = None,
    ) -> None:
        super().__init__(net, net_overrides, conditioner or default_toy_conditioner(), seed, scale)
        self.lora = as_group(LoRA, lora, "lora")
        if self.lora is not None:
            check_lora_recipe(self.lora, teacher_net=teacher_net, generator_checkpoint=generator_checkpoint,
                              critic_checkpoint=critic_checkpoint, fp8=self.scale.fp8)
        if dfake_gen_update_ratio < 1:
            raise ValueError(f"dfake_gen_update_ratio must be >= 1, got {dfake_gen_update_ratio}")
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_net, self.teacher_net_overrides = teacher_net, dict(teacher_net_overrides or {})
        self.generator_checkpoint, self.critic_checkpoint = generator_checkpoint, critic_checkpoint
        self.schedule = as_group(FewStepSchedule, schedule, "schedule")
        self.timesteps = self.schedule.timesteps
        for old, new, value in (("real_guidance_scale", "guidance_scale", real_guidance_scale),
                                ("fake_guidance_scale", "critic_guidance_scale", fake_guidance_scale)):
            if value is not None:
                raise ValueError(f"{old} (the reference's CFG convention, c + s (c - u)) is now {new} in Wan's "
                                 f"convention, u + g (c - u): set {new}: {value + 1} for {old}: {value}")
        self.guidance_scale, self.critic_guidance_scale = guidance_scale, critic_guidance_scale
        self.score_timesteps = as_group(ScoreTimesteps, score_timesteps, "score_timesteps")
        self.ratio = dfake_gen_update_ratio
        self.generator_optimizer = as_group(Optimizer, generator_optimizer, "generator_optimizer", GENERATOR_OPTIMIZER)
        self.critic_optimizer = as_group(Optimizer, critic_optimizer, "critic_optimizer", CRITIC_OPTIMIZER)
        self.video_shape = list(video_shape or [3, 4, 16, 16])
        self.predict_weights, self.predict_seed = predict_weights, predict_seed
        self.generator_steps = 0
        self.critic_steps = 0
        self.ema_started = False
        self.generator: nn.Module | None = None
        self.generator_ema: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.causal = as_group(BlockCausal, causal, "causal")
        self.same_step_across_blocks, self.last_step_only = same_step_across_blocks, last_step_only
        self.context_noise = context_noise
        self.max_rollout_frames = max_rollout_frames
        self.distribution_loss, self.sid_alpha, self.teacher_forcing = distribution_loss, sid_alpha, teacher_forcing
        self.gan = as_group(GAN, gan, "gan")
        self.disc_head: nn.Module | None = None
        if teacher_forcing and (distribution_loss != "causvid" or self.causal is None):
            raise ValueError("teacher_forcing applies to distribution_loss=causvid with a causal generator "
                             "(causal: {frames_per_block: ...})")
        self.needs_real_latents = distribution_loss == "causvid" or self.gan is not None
        self.rollout = self._build_rollout()
        self.objective = (SiDObjective(guidance_scale, sid_alpha) if distribution_loss == "sid"
                          else DMDObjective(guidance_scale, critic_guidance_scale))

    def _build_rollout(self):
        """The generator's training sample (sfplus.modules.distill_parts), from the recipe's settings."""
        causal = self.causal
        if self.distribution_loss == "causvid":
            return CausVidStep(self.timesteps, causal, self.teacher_forcing)
        exits = ExitSteps(len(self.timesteps), self.same_step_across_blocks, self.last_step_only)
        if causal is None:
            return BidirectionalRollout(self.timesteps, exits, self.video_shape)
        return SelfForcingRollout(self.timesteps, exits, self.video_shape, causal.frames_per_block,
                                  causal.independent_first_frame, self.context_noise, self.max_rollout_frames,
                                  rewindow=self._last_window)

    def configure_model(self) -> None:
        if self.generator is not None:
            return
        if self.lora is not None:
            return self._configure_lora()
        with self.net_context():
            self.teacher = self.build_teacher()
            self.generator = self.build_net()
            self.critic = self.build_net()
            self.generator_ema = self.build_net()
            if self.gan is not None:
                self.disc_head = self._build_head()
        trainable = [self.generator, self.critic] + ([self.disc_head] if self.disc_head is not None else [])
        self.prepare_nets(trainable, [self.teacher], [self.generator_ema])
        if not self._weights_pending:
            self.load_initial_weights()

    def _configure_lora(self) -> None:
        """One base (the teacher slot) with the generator's, the critic's and the EMA's adapters
        (sfplus.modules.lora)."""
        with self.net_context():
            nets = build_lora_nets(self.build_net(), self.lora, self.scale.frozen_dtype)
            self.teacher, self.generator, self.critic, self.generator_ema = nets
            if self.gan is not None:
                self.disc_head = self._build_head()
        trainable = [self.teacher.net] + ([self.disc_head] if self.disc_head is not None else [])
        self.prepare_nets(trainable, [], [], checkpoint_context=self.generator.switch.checkpoint_contexts)
        if not self._weights_pending:
            self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Teacher from its file; generator and critic from theirs, or from the teacher's (reference default).
        With LoRA: the base from the teacher's file, seeded fresh adapters (the generator's from
        ``lora.generator_init`` when set), the EMA a copy of the generator's."""
        if self.lora is not None:
            load_initial_adapters(self.generator, self.critic, self.generator_ema, self.lora, self.teacher_checkpoint,
                                  self.seed)
            return self._load_head()

        if self.teacher_checkpoint:
            load_weights(self.teacher, self.teacher_checkpoint)
        for net, path in ((self.generator, self.generator_checkpoint), (self.critic, self.critic_checkpoint)):
            path = path or self.teacher_checkpoint
            if path:
                load_weights(net, path)  # from the file: a bf16 teacher must not round the trainable nets
            else:
                copy_weights(net, self.teacher)
        copy_weights(self.generator_ema, self.generator)
        self._load_head()

    def _load_head(self) -> None:
        if self.disc_head is not None:
            # Fresh weights from the seed alone, built whole on the CPU and then loaded (sharded or not): the same
            # head whatever the world size or construction device.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(self.seed, "disc_head") % (2**31))
                fresh = self._build_head()
            load_weights(self.disc_head, fresh.state_dict())

    def build_teacher(self) -> nn.Module:
        if self.teacher_net is None:
            return self.build_net()
        return build_dit(self.teacher_net, **self.teacher_net_overrides)

    def _build_head(self) -> nn.Module:
        cfg = self.generator.config
        blocks = [b % cfg.num_layers for b in self.gan.blocks]
        self.gan.blocks = blocks
        return DiscriminatorHead(cfg.dim, cfg.num_heads, len(blocks), tokens_per_block=self.gan.tokens_per_block,
                                 ffn_dim=self.gan.ffn_dim, register_norm_weight=self.gan.register_norm_weight,
                                 norm2_affine=self.gan.norm2_affine)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A head saved with other head options (e.g. sfplus's head before it followed the reference's) cannot be
        # converted honestly (a narrower FFN, trained norm2 affines and their AdamW moments): name the options that
        # rebuild the saved head instead of listing its keys.
        sd = checkpoint.get("state_dict", {})
        if self.disc_head is not None and any(k.startswith("disc_head.") for k in sd):
            saved, own = DiscriminatorHead.layout_of(sd, "disc_head."), self.disc_head.layout()
            if saved != own:
                def yaml(layout: dict) -> str:
                    return "{" + ", ".join(f"{k}: {'null' if v is None else str(v).lower()}"
                                           for k, v in layout.items()) + "}"
                raise CheckpointError(f"the checkpoint's discriminator head was built with gan: {yaml(saved)}, this "
                                      f"module's with {yaml(own)}: set those gan options to resume it (sfplus "
                                      "before the reference's head wrote ffn_dim = 4 x width, register_norm_weight "
                                      "false, norm2_affine true)")
        super().on_load_checkpoint(checkpoint)

    def configure_optimizers(self):
        g = self.generator_optimizer.build(self.generator.parameters())
        critic_lr = self.critic_optimizer.lr
        groups = [{"params": list(self.critic.parameters()), "lr": critic_lr}]
        if self.disc_head is not None:
            groups.append({"params": list(self.disc_head.parameters()),
                           "lr": critic_lr * self.gan.head_lr_multiplier})
        c = self.critic_optimizer.build(groups)
        return [g, c]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora is not None:  # what `sfplus export` needs to write the LoRA file (sfplus.weights.lora_files)
            checkpoint["sfplus"]["lora"] = {"rank": self.lora.rank, "alpha": self.lora.alpha,
                                            "scale": self.lora.scale, "targets": list(self.lora.targets),
                                            "base": self.teacher_checkpoint}

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "generator_steps": self.generator_steps, "critic_steps": self.critic_steps,
                "ema_started": int(self.ema_started)}

    ema_update_kind = "generator"  # the EMA moves after generator updates (sfplus.modules.contract.EMAHost)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.generator_ema, self.generator)]

    def in_gan_warmup(self) -> bool:
        return self.gan is not None and self.critic_steps < self.gan.warmup_steps

    def generator_due(self) -> bool:
        """A generator update is due at iterations 0, r, 2r, ... before that iteration's critic update
        (counted from the end of a GAN warm-up)."""
        if self.in_gan_warmup():
            return False
        it = self.iteration - (self.gan.warmup_steps if self.gan is not None else 0)
        done = self.generator_steps
        return it % self.ratio == 0 and done <= it // self.ratio

    # ---- one update per batch ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        prompts = list(batch["prompts"])
        cond = self.conditioner.text(prompts, self.device)
        uncond = self.conditioner.negative(len(prompts), self.device)
        cond, uncond = self.with_image(batch, cond, uncond)
        real = None
        if self.needs_real_latents:
            if "latents" not in batch:
                raise KeyError("this recipe (causvid or gan) needs clean latents: the batch has no 'latents' "
                               "(use LatentShardDataModule or ToyDataModule)")
            real = batch["latents"].to(self.device)
        if self.generator_due():
            self._generator_update(cond, uncond, real)
        else:
            self._critic_update(cond, real)

    def _score_timesteps(self, f: int, rollout, noise: SampleNoise) -> torch.Tensor:
        """Score timesteps [B, F] (docs/algorithms.md, 'Score timesteps'): raw integer in [min, max), shift,
        clamp to [20, 980]."""
        bounds, shift = self.score_timesteps, self.schedule.shift
        min_t, max_t = bounds.min, 1000
        if bounds.above_exit_step and rollout.t_to is not None:
            min_t = int(round(unwarp_timestep(rollout.t_to, shift)))
        if bounds.below_exit_step and rollout.t_from is not None:
            max_t = int(round(unwarp_timestep(rollout.t_from, shift)))
        t_raw = noise.randint(min_t, max(max_t, min_t + 1))
        return score_timesteps_from_raw(t_raw, f, shift=shift).to(self.device)

    def _rollout(self, cond: Cond, grad: bool, kind: str, real: torch.Tensor | None) -> tuple[Rollout, SampleNoise]:
        """The generator's sample for a loss and this update's per-sample noise streams."""
        noise = self.sample_noise(kind, cond["context"].shape[0])
        return self.rollout(self.generator, cond, noise, self, kind=kind, grad=grad, real=real), noise

    def _last_window(self, video: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``frames`` of a long rollout as the score nets see them (docs/algorithms.md, 'Long rollouts'):
        its first frame is replaced by the re-encoding of the last pixel frame decoded before the window; the
        generator loss skips the first block. Returns (video [B, C, frames, H, W], mask of the same shape)."""
        with torch.no_grad():
            earlier = self.conditioner.decode(video[:, :, : video.shape[2] - frames + 1].detach())
            first = self.conditioner.encode_video(earlier[:, :, -1:]).to(video.dtype)
        window = torch.cat([first, video[:, :, -(frames - 1):]], dim=2)
        mask = torch.ones_like(window, dtype=torch.bool)
        mask[:, :, : 1 if self.causal.independent_first_frame else self.causal.frames_per_block] = False
        return window, mask

    def _generator_update(self, cond: Cond, uncond: Cond, real: torch.Tensor | None) -> None:
        g_opt, _ = self.optimizers()
        logs: dict[str, Any] = {}
        with self.toggled_optimizer(g_opt):
            rollout, g = self._rollout(cond, grad=True, kind="gen", real=real)
            x = rollout.x0
            t = self._score_timesteps(x.shape[2], rollout, g)
            eps = g.randn_like(x)
            loss, parts = self.objective.generator_loss(x, t, eps, fake=self.critic, real=self.teacher, cond=cond,
                                                        uncond=uncond, mask=rollout.loss_mask)
            logs.update({f"train/{k}": v for k, v in parts.items()})
            if self.gan is not None:
                gan_loss, gan_logs = gan_generator_term(
                    self.critic, self.disc_head, x, t, eps, cond, self.gan.blocks, x_real=real,
                    relativistic=self.gan.relativistic, gan_g_weight=self.gan.g_weight, generator=g,
                )
                loss = self.gan.dmd_weight * loss + gan_loss
                logs.update({f"train/gan_{k}": v for k, v in gan_logs.items()})
            grad_norm = self.optimizer_update(g_opt, loss, self.generator.parameters(),
                                              self.generator_optimizer.max_grad_norm)
        if grad_norm is None:
            return
        self.generator_steps += 1
        self.last_update = "generator"
        logs.update({
            "train/generator_loss": loss.detach().float(), "train/generator_grad_norm": grad_norm,
            "train/exit_step": float(rollout.exit_index), "train/generator_steps": float(self.generator_steps),
        })
        self.log_dict({k: (v.detach().float() if torch.is_tensor(v) else float(v)) for k, v in logs.items()})

    def _critic_update(self, cond: Cond, real: torch.Tensor | None) -> None:
        _, c_opt = self.optimizers()
        with torch.no_grad():
            rollout, g = self._rollout(cond, grad=False, kind="critic", real=real)
        x = rollout.x0.detach()
        t = self._score_timesteps(x.shape[2], rollout, g)
        eps = g.randn_like(x)
        loss = critic_flow_loss(self.critic, x, t, eps, cond)
        logs: dict[str, Any] = {"train/critic_flow_loss": loss.detach()}
        if self.gan is not None:
            gan_loss, gan_logs = gan_critic_loss(
                self.critic, self.disc_head, real, x, t, eps, cond, self.gan.blocks,
                relativistic=self.gan.relativistic, gan_d_weight=self.gan.d_weight,
                r1_weight=self.gan.r1_weight, r2_weight=self.gan.r2_weight, r1_sigma=self.gan.r1_sigma,
                r2_sigma=self.gan.r2_sigma, generator=g,
            )
            loss = loss + gan_loss
            logs.update({f"train/disc_{k}": v for k, v in gan_logs.items()})
        if self.gan is not None:  # warm-up: only the head learns
            c_opt.param_groups[0]["lr"] = 0.0 if self.in_gan_warmup() else self.critic_optimizer.lr
        head = list(self.disc_head.parameters()) if self.disc_head is not None else []
        params = list(self.critic.parameters()) + head
        grad_norm = self.optimizer_update(c_opt, loss, params, self.critic_optimizer.max_grad_norm)
        if grad_norm is None:
            return
        self.critic_steps += 1
        self.iteration += 1
        self.last_update = "critic"
        logs.update({
            "train/critic_loss": loss.detach(), "train/critic_grad_norm": grad_norm,
            "train/critic_timestep": t.float().mean(), "train/iteration": float(self.iteration),
        })
        self.log_dict({k: (v.detach().float() if torch.is_tensor(v) else float(v)) for k, v in logs.items()},
                      prog_bar=False)

    # ---- generation -------------------------------------------------------------------------------------------
    def sample_weights(self) -> tuple[str, ...]:
        return ("generator", "ema", "teacher")

    def sampling_net(self) -> nn.Module:
        name, _ = self.weights_choice()
        if name is not None:
            return self.generator_ema if name == "ema" else self.generator
        if self.predict_weights == "ema" and self.ema_started:
            return self.generator_ema
        return self.generator

    def sample_blocks(
        self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator
    ) -> Iterator[torch.Tensor]:
        name, options = self.weights_choice()
        if name == "teacher":
            # The teacher's own many-step CFG sampler from the same noise (the SampleLogger's reference row):
            # ``steps`` and ``shift`` from the caller, the real score's guidance scale.
            yield teacher_sample(self.teacher, noise, cond, uncond, num_steps=int(options.get("steps", 40)),
                                 shift=float(options.get("shift", self.schedule.shift)),
                                 guidance_scale=self.guidance_scale)
        elif self.causal is not None:
            c = self.causal
            yield from causal_generate(
                self.sampling_net(), noise, self.timesteps, cond, frames_per_block=c.frames_per_block,
                generator=generator, independent_first_frame=c.independent_first_frame,
                local_window_frames=c.local_window_frames, sink_frames=c.sink_frames, context_noise=self.context_noise,
            )
        else:
            yield few_step_sample(self.sampling_net(), noise, self.timesteps, cond, generator)

    def sample(
        self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator
    ) -> torch.Tensor:
        blocks = list(self.sample_blocks(cond, uncond, noise, generator))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)

    def sampler_description(self) -> dict[str, Any]:
        weights = "ema" if (self.predict_weights == "ema" and self.ema_started) else "generator"
        kind = "causal-few-step" if self.causal is not None else "few-step"
        out = {"kind": kind, "timesteps": self.timesteps, "weights": weights}
        if self.causal is not None:
            out.update(frames_per_block=self.causal.frames_per_block,
                       independent_first_frame=self.causal.independent_first_frame)
        return out


