"""LightningModules: the recipes.

* :class:`DiffusionModule` — flow-matching training of one DiT (the toy teacher; fine-tuning).
* :class:`DistillModule` — DMD distillation of a teacher into a few-step generator, with a fake-score critic,
  manual optimization (one optimizer update per batch: a generator update every ``dfake_gen_update_ratio``-th
  iteration, a critic update every iteration, each on a fresh batch, as the reference's trainer), and a frozen
  EMA copy of the generator.

Counters (``iteration`` = critic updates, ``generator_steps``, ``critic_steps``) are the module's own and are saved
in checkpoints; ``trainer.global_step`` counts every optimizer update (lightning-notes §2.1).

Randomness is explicit and resumable without saved RNG state: each update re-seeds its generators from
``(seed, rank, update index)`` — noise and score timesteps — or ``(seed, update index)`` for values all ranks must
agree on (the exit step).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import lightning as L
import torch
from torch import nn

from sfplus.conditioning import Conditioner, Cond
from sfplus.flow import NUM_TRAIN_TIMESTEPS, score_timesteps_from_raw, shift_sigma, warp_timesteps
from sfplus.noise import SampleNoise, stable_seed
from sfplus.nets.checkpoints import CheckpointError
from sfplus.objectives.diffusion import flow_matching_loss
from sfplus.objectives.dmd import critic_flow_loss, dmd_generator_loss, dmd_kl_grad
from sfplus.rollout import bidirectional_rollout
from sfplus.sampling import few_step_sample, teacher_sample


def sample_seed(base_seed: int, index: int, sample: int) -> int:
    """Seed of one generated video: a function of (base seed, prompt index, sample index) only."""
    return stable_seed("sample", base_seed, index, sample)


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] → uint8 [B, T, H, W, 3]."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).contiguous()


class _RecipeModule(L.LightningModule):
    """Shared plumbing: nets from presets, counters, seeded RNG, checkpoint hooks, generation."""

    frozen_prefixes: tuple[str, ...] = ()

    def __init__(
        self, net: str, net_overrides: dict | None, conditioner: Conditioner, seed: int,
        scale: dict | None = None,
    ) -> None:
        super().__init__()
        self.net_name, self.net_overrides = net, dict(net_overrides or {})
        scale = dict(scale or {})
        self.activation_checkpointing = bool(scale.pop("activation_checkpointing", False))
        self.param_dtype = scale.pop("param_dtype", "bf16")
        self.frozen_dtype = scale.pop("frozen_dtype", None)
        if scale:
            raise ValueError(f"unknown scale options {sorted(scale)}: use activation_checkpointing, param_dtype, frozen_dtype")
        self._weights_pending = False
        self.conditioner = conditioner
        self.seed = seed
        self.iteration = 0
        self.batches_seen = 0
        self._warned_position = False
        self.last_update: str | None = None
        self.automatic_optimization = False  # alternating updates, own clipping and counters

    # ---- nets -------------------------------------------------------------------------------------------------
    def build_net(self) -> nn.Module:
        from sfplus.nets.presets import build_dit

        return build_dit(self.net_name, **self.net_overrides)

    def data_parallel_mesh(self):
        """The data-parallel device mesh under ModelParallelStrategy (None otherwise)."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return None
        names = mesh.mesh_dim_names or ()
        return mesh["data_parallel"] if "data_parallel" in names else mesh

    def prepare_nets(self, trainable: list[nn.Module], frozen: list[nn.Module], ema: list[nn.Module]) -> None:
        """Activation checkpointing, frozen dtype and FSDP2 sharding, in that order (see sfplus.parallel).

        Frozen nets (the teacher) may be stored in ``frozen_dtype``; EMA copies stay fp32 (they average
        small updates).
        """
        from sfplus.parallel import DTYPES, apply_activation_checkpointing, shard_dit

        for net in [*frozen, *ema]:
            net.requires_grad_(False).eval()
        for net in frozen:
            if self.frozen_dtype:
                net.to(DTYPES[self.frozen_dtype])
        if self.activation_checkpointing:
            for net in trainable:
                apply_activation_checkpointing(net)
        mesh = self.data_parallel_mesh()
        if mesh is not None:
            for net in [*trainable, *frozen, *ema]:
                shard_dit(net, mesh, param_dtype=DTYPES[self.param_dtype])

    def net_context(self):
        """Nets are built on the meta device when they will be sharded, and filled after materialisation."""
        import contextlib

        self._weights_pending = self.data_parallel_mesh() is not None
        return torch.device("meta") if self._weights_pending else contextlib.nullcontext()

    def load_initial_weights(self) -> None:
        raise NotImplementedError

    def _load_pending(self) -> None:
        if self._weights_pending:
            self.load_initial_weights()
            self._weights_pending = False

    def on_fit_start(self) -> None:
        self._load_pending()

    def on_predict_start(self) -> None:
        self._load_pending()

    def on_validation_start(self) -> None:
        self._load_pending()

    # ---- randomness -------------------------------------------------------------------------------------------
    def sample_noise(self, kind: str, batch: int) -> SampleNoise:
        """Per-sample streams for this rank's rows of the global batch at the current update (see sfplus.noise)."""
        start = self.global_rank * batch
        return SampleNoise.for_rows(self.seed, self.trainer.global_step, kind, rows=range(start, start + batch),
                                    device=self.device)

    def shared_randint(self, kind: str, high: int) -> int:
        """An integer in [0, high) that every rank draws identically (e.g. the rollout's exit step)."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, self.trainer.global_step, kind))
        return int(torch.randint(high, (1,), generator=g))

    # ---- data position (exact resume) -------------------------------------------------------------------------
    def _sync_data_position(self) -> None:
        """Point the batch sampler at the next unconsumed batch (see EpochBatchSampler.position).

        Done at the start of training and of every epoch, from the module's own batch count, so a resumed run
        continues exactly where the checkpoint was taken, whatever Lightning's epoch bookkeeping says.
        """
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "position"):
            sampler.position = self.batches_seen
        elif self.batches_seen and self.trainer.current_epoch == 0 and not self._warned_position:
            self._warned_position = True
            import warnings

            warnings.warn("the training batch sampler cannot seek: a resumed run replays data", stacklevel=2)

    def on_train_start(self) -> None:
        self._sync_data_position()

    def on_train_epoch_start(self) -> None:
        self._sync_data_position()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Counted before the step: checkpoint callbacks save in on_train_batch_end, which runs before the module's.
        self.batches_seen += 1

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {"iteration": self.iteration, "batches_seen": self.batches_seen}

    def state_dict(self, *args, **kwargs):
        """The module's state without the frozen nets (teacher, encoders): they are rebuilt from their own files,
        and would multiply checkpoint size for nothing. Applies to single-file and sharded checkpoints alike."""
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        frozen = tuple(prefix + p for p in self.frozen_prefixes)
        for key in [k for k in sd if k.startswith(frozen)]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load everything but the frozen nets, which keep their current weights."""
        frozen = {k: v for k, v in super().state_dict().items() if k.startswith(self.frozen_prefixes)}
        return super().load_state_dict({**state_dict, **frozen}, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sfplus"] = {
            "counters": self.counters(), "class": type(self).__name__, "net": self.net_name,
            "net_overrides": self.net_overrides, "sampler": self.sampler_description(),
            "video_shape": self.video_shape,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "sfplus" not in checkpoint:
            raise CheckpointError("not a checkpoint of an sfplus module (no 'sfplus' entry)")
        # Sharded (distributed) checkpoints were already loaded into the module by the strategy, which checks keys.
        sd = checkpoint.get("state_dict", {})
        own = self.state_dict() if sd else {}  # without the frozen nets, like the checkpoint
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or mismatched:
            saved = checkpoint.get("sfplus", {}).get("class", "unknown")
            msg = [f"checkpoint (saved by {saved}) does not match this {type(self).__name__}:"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
                if items:
                    msg.append(f"  {title}: " + ", ".join(items[:6]) + (f" ... ({len(items)})" if len(items) > 6 else ""))
            raise CheckpointError("\n".join(msg))
        counters = checkpoint.get("sfplus", {}).get("counters", {})
        for name, value in counters.items():
            setattr(self, name, int(value))

    # ---- generation -------------------------------------------------------------------------------------------
    def noise_for(self, index: torch.Tensor, sample: torch.Tensor, shape: Sequence[int], base_seed: int) -> torch.Tensor:
        """Per-video starting noise [B, *shape], a function of (base seed, prompt index, sample index) only."""
        out = []
        for i, s in zip(index.tolist(), sample.tolist()):
            g = torch.Generator().manual_seed(sample_seed(base_seed, i, s))
            out.append(torch.randn(tuple(shape), generator=g))
        return torch.stack(out).to(self.device)

    def sample(self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sampler_description(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate one video per batch item; items whose outputs already exist are skipped.

        Returns ``{"videos": uint8 [B, T, H, W, 3], "latents", "prompts", "text", "index", "sample", "seed",
        "sampler"}`` for the items generated (``index = -1`` padding items are dropped).
        """
        keep = [i for i, idx in enumerate(batch["index"].tolist()) if idx >= 0]
        writer = next((cb for cb in self.trainer.callbacks if hasattr(cb, "exists")), None) if self._trainer else None
        if writer is not None:
            keep = [
                i for i in keep
                if not writer.exists(batch["text"][i], int(batch["index"][i]), int(batch["sample"][i]))
            ]
        if not keep:
            return {"videos": None, "index": torch.empty(0, dtype=torch.long)}
        prompts = [batch["prompts"][i] for i in keep]
        index, sample = batch["index"][keep], batch["sample"][keep]
        cond = self.conditioner.text(prompts, self.device)
        uncond = self.conditioner.negative(len(prompts), self.device)
        noise = self.noise_for(index, sample, self.video_shape, self.predict_seed)
        # Re-noising streams per video too: a video does not depend on the batch it was generated in.
        g = SampleNoise([stable_seed("renoise", self.predict_seed, i, s) for i, s in zip(index.tolist(), sample.tolist())],
                        self.device)
        latents = self.sample(cond, uncond, noise, g)
        videos = self.conditioner.decode(latents)
        return {
            "videos": to_uint8_video(videos),
            "latents": latents.cpu(),
            "prompts": prompts,
            "text": [batch["text"][i] for i in keep],
            "index": index.cpu(),
            "sample": sample.cpu(),
            "seed": [sample_seed(self.predict_seed, i, s) for i, s in zip(index.tolist(), sample.tolist())],
            "sampler": self.sampler_description(),
        }


class DiffusionModule(_RecipeModule):
    """Flow-matching training of one DiT from scratch or from weights (the toy teacher).

    Args:
        net: DiT preset name (``sfplus.nets.presets``), e.g. ``toy`` or ``wan2.1-t2v-1.3b``.
        net_overrides: preset fields to change (e.g. ``{"num_layers": 2}``).
        conditioner: frozen encoders (text, codec).
        init_checkpoint: weights to start from (None: fresh init).
        lr, betas, weight_decay: AdamW settings.
        max_grad_norm: gradient clipping norm.
        cond_dropout: probability of training on the negative prompt instead (enables CFG).
        train_shift: shift applied to uniformly drawn training sigmas.
        video_shape: latent shape ``[C, F, H, W]`` generated by ``predict``.
        sample_steps, sample_shift, guidance_scale: the Euler/CFG sampler used by ``predict``.
        seed: base seed of training noise; predict_seed: base seed of generated videos.
        scale: ``{activation_checkpointing: bool, param_dtype: bf16|fp32 (FSDP compute dtype),
            frozen_dtype: bf16|fp32|None}`` (see sfplus.parallel).
    """

    frozen_prefixes = ("conditioner.",)

    def __init__(
        self,
        net: str = "toy",
        net_overrides: dict | None = None,
        conditioner: Conditioner | None = None,
        init_checkpoint: str | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        cond_dropout: float = 0.1,
        train_shift: float = 1.0,
        video_shape: list[int] | None = None,
        sample_steps: int = 40,
        sample_shift: float = 3.0,
        guidance_scale: float = 3.0,
        seed: int = 0,
        predict_seed: int = 0,
        scale: dict | None = None,
    ) -> None:
        super().__init__(net, net_overrides, conditioner or _default_toy_conditioner(), seed, scale)
        self.init_checkpoint = init_checkpoint
        self.lr, self.betas, self.weight_decay, self.max_grad_norm = lr, tuple(betas), weight_decay, max_grad_norm
        self.cond_dropout, self.train_shift = cond_dropout, train_shift
        self.video_shape = list(video_shape or [3, 4, 16, 16])
        self.sample_steps, self.sample_shift, self.guidance_scale = sample_steps, sample_shift, guidance_scale
        self.predict_seed = predict_seed
        self.model: nn.Module | None = None
        self.model_ema: nn.Module | None = None
        self.ema_started = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with self.net_context():
            self.model = self.build_net()
            self.model_ema = self.build_net()
        self.prepare_nets([self.model], [], [self.model_ema])
        if not self._weights_pending:
            self.load_initial_weights()

    def load_initial_weights(self) -> None:
        from sfplus.parallel import load_weights

        if self.init_checkpoint:
            load_weights(self.model, self.init_checkpoint)
        else:
            # Fresh weights are a function of the seed, so two runs of one config start identically.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(self.seed, "init") % (2**31))
                self.model.init_weights()
        _copy_weights(self.model_ema, self.model)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "ema_started": int(self.ema_started)}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.model_ema, self.model)]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = batch["latents"].to(self.device)
        prompts = list(batch["prompts"])
        b = latents.shape[0]
        noise = self.sample_noise("train", b)
        drop = noise.rand() < self.cond_dropout
        prompts = [self.conditioner.negative_prompt if d else p for p, d in zip(prompts, drop.tolist())]
        cond = self.conditioner.text(prompts, self.device)
        # sigma ~ U(0, 1] through the shift (sigma > 0: the x0 <-> flow conversions divide by it).
        t = (NUM_TRAIN_TIMESTEPS * shift_sigma(1.0 - noise.rand().double(), self.train_shift)).float().to(self.device)
        eps = noise.randn_like(latents)
        loss = flow_matching_loss(self.model, latents, t, eps, cond)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        opt.step()
        self.iteration += 1
        self.last_update = "model"
        self.log_dict({"train/loss": loss.detach(), "train/grad_norm": grad_norm, "train/iteration": float(self.iteration)}, prog_bar=True)
        return loss.detach()

    def sample(self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator) -> torch.Tensor:
        net = self.model_ema if self.ema_started else self.model
        return teacher_sample(
            net, noise, cond, uncond, num_steps=self.sample_steps, shift=self.sample_shift,
            guidance_scale=self.guidance_scale,
        )

    def sampler_description(self) -> dict[str, Any]:
        return {"kind": "euler-cfg", "steps": self.sample_steps, "shift": self.sample_shift,
                "guidance_scale": self.guidance_scale, "weights": "ema" if self.ema_started else "model"}


class DistillModule(_RecipeModule):
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


def _default_toy_conditioner() -> Conditioner:
    from sfplus.conditioning import ToyConditioner

    return ToyConditioner()


@torch.no_grad()
def _copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy parameters between two identically built (and identically sharded) nets, local shards only."""
    for d, p in zip(dst.parameters(), src.parameters()):
        d_local = d.to_local() if hasattr(d, "to_local") else d
        p_local = p.to_local() if hasattr(p, "to_local") else p
        d_local.copy_(p_local)
