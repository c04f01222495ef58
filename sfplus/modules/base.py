"""Shared plumbing of the recipe LightningModules: nets from presets, sharding, counters, per-sample noise,
checkpoints without frozen nets, seekable data position, and batch generation.

Counters (``iteration`` = critic updates, ``generator_steps``, ``critic_steps``, ``batches_seen``) are the
module's own and are saved in checkpoints; ``trainer.global_step`` counts every optimizer update
(it counts ``optimizer.step()`` calls over all optimizers).

Randomness is explicit and resumable without saved RNG state: per-sample streams seeded from
``(seed, update index, purpose, global row)`` (sfplus.noise), or ``(seed, update index)`` for values all ranks must
agree on (the exit step).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn

from sfplus.conditioning.conditioner import Conditioner, ToyConditioner
from sfplus.known_warnings import excuse_frozen_eval_modules
from sfplus.layout import Layout, mesh_layout, set_layout
from sfplus.modules.generation import Generation
from sfplus.modules.groups import Scale, as_group
from sfplus.nets.fp8 import quantize_dit_fp8
from sfplus.nets.presets import build_dit
from sfplus.noise import SampleNoise, stable_seed
from sfplus.parallel import copy_weights, is_sharded, load_weights, parallelize, settle_mixed_precision
from sfplus.progress import default_callbacks
from sfplus.weights.checkpoints import CheckpointError


class RecipeModule(Generation, L.LightningModule):
    """Shared plumbing: nets from presets, counters, seeded RNG, checkpoint hooks, generation."""

    frozen_prefixes: tuple[str, ...] = ()

    def __init__(
        self, net: str, net_overrides: dict | None, conditioner: Conditioner, seed: int,
        scale: Scale | dict | None = None,
    ) -> None:
        super().__init__()
        self.net_name, self.net_overrides = net, dict(net_overrides or {})
        scale = as_group(Scale, scale, "scale") or Scale()
        self.scale = scale  # read where used (self.scale.fp8, ...): one copy of each setting
        self._micro = 0  # micro-batch index inside the current (accumulated) update
        self._weights_pending = False
        self._sharded_trainable: list[nn.Module] = []  # set by prepare_nets
        self._layout: Layout | None = None  # data x sequence parallel position; None: plain data parallelism
        self._sp_group = None  # the sequence-parallel process group (scale.sequence_parallel > 1)
        self.conditioner = conditioner
        self.seed = seed
        self.iteration = 0
        self.batches_seen = 0
        self._warned_position = False
        self.last_update: str | None = None
        self.automatic_optimization = False  # alternating updates, own clipping and counters
        self._weights_choice: tuple[str, dict[str, Any]] | None = None  # see using_weights

    # ---- nets -------------------------------------------------------------------------------------------------
    def build_net(self) -> nn.Module:
        return build_dit(self.net_name, **self.net_overrides)

    def data_parallel_mesh(self):
        """The data-parallel device mesh under ModelParallelStrategy (None otherwise)."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return None
        names = mesh.mesh_dim_names or ()
        return mesh["data_parallel"] if "data_parallel" in names else mesh

    def prepare_nets(self, trainable: list[nn.Module], frozen: list[nn.Module], ema: list[nn.Module],
                     checkpoint_context=None) -> None:
        """Freeze, compile, checkpoint and shard the nets as ``scale`` says (:func:`sfplus.parallel.parallelize`).

        Frozen nets (the teacher) may be stored in ``frozen_dtype``; EMA copies stay fp32 (they average
        small updates). ``checkpoint_context``: see :func:`sfplus.parallel.parallelize`.
        """
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None or self.scale.sequence_parallel > 1:  # checks the mesh against scale.sequence_parallel
            mesh, self._sp_group, self._layout = mesh_layout(mesh, self.scale.sequence_parallel)
        set_layout(self._layout)  # the batch samplers split data over data-parallel ranks only
        s = self.scale
        parallelize(trainable, frozen, ema, mesh, activation_checkpointing=s.activation_checkpointing,
                    compile=s.compile, param_dtype=s.param_dtype, frozen_dtype=s.frozen_dtype,
                    sequence_parallel=self._sp_group, checkpoint_context=checkpoint_context)
        sharded = mesh is not None and mesh.size() > 1
        self._sharded_trainable = list(trainable) if sharded else []

    def net_context(self):
        """Nets are built on the meta device when they will be sharded, and filled after materialisation."""
        self._weights_pending = self.data_parallel_mesh() is not None
        return torch.device("meta") if self._weights_pending else contextlib.nullcontext()

    def load_initial_weights(self) -> None:
        raise NotImplementedError

    def _load_pending(self) -> None:
        if self._weights_pending:
            self.load_initial_weights()
            self._weights_pending = False

    def configure_callbacks(self):
        return default_callbacks(self.trainer)  # progress lines when stdout is not a terminal

    def on_fit_start(self) -> None:
        excuse_frozen_eval_modules(self)  # the frozen nets are in eval mode on purpose
        if self.scale.fp8:
            raise ValueError("scale.fp8 is for predict only: FP8 linears have no backward; train without it")
        self._load_pending()
        # Before any update freezes a net (see settle_mixed_precision): FSDP2 fixes gradient dtypes at first use.
        for net in self._sharded_trainable:
            settle_mixed_precision(net)

    def on_predict_start(self) -> None:
        self._load_pending()
        if self.scale.fp8:
            self._quantize_fp8()

    def _quantize_fp8(self) -> None:
        """Swap the block linears of every DiT in the module for FP8 ones (after the weights are loaded)."""
        for name, net in self.named_children():
            if not hasattr(net, "blocks"):
                continue
            if is_sharded(net):
                raise ValueError(f"scale.fp8: {name} is sharded (FSDP); predict with data parallelism only")
            quantize_dit_fp8(net)

    def on_validation_start(self) -> None:
        self._load_pending()

    # ---- randomness -------------------------------------------------------------------------------------------
    def sample_noise(self, kind: str, batch: int) -> SampleNoise:
        """Per-sample streams for this rank's rows of the global batch at the current update (see sfplus.noise).

        With gradient accumulation, micro-batch ``m`` of ``W`` ranks holds rows ``[(m*W + r)*B, ...)`` of the
        update's global batch — the rows rank ``m*W + r`` of ``accumulate * W`` ranks would hold — so 8 GPUs
        accumulating 8 micro-batches reproduce 64 GPUs.
        """
        rank, world = ((self._layout.data_rank, self._layout.data_world) if self._layout is not None
                       else (self.global_rank, self.trainer.world_size))  # a sequence-parallel group shares rows
        start = (self._micro * world + rank) * batch
        return SampleNoise.for_rows(self.seed, self.trainer.global_step, kind, rows=range(start, start + batch),
                                    device=self.device)

    def optimizer_update(self, opt, loss: torch.Tensor, params, max_norm: float) -> torch.Tensor | None:
        """Backward ``loss`` into accumulated gradients; on the last micro-batch of the update clip the global
        gradient norm of ``params``, step, and free the gradients. Returns the gradient norm after a step, None
        before it.

        Freeing right after the step matters with alternating updates: otherwise each net's fp32 gradients (5.3 GiB
        for a 1.3B net, unsharded) stay allocated through the other net's updates until its own next one.
        """
        if self._micro == 0:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss / self.scale.accumulate_grad_batches)
        if self._micro + 1 < self.scale.accumulate_grad_batches:
            self._micro += 1
            self.last_update = None
            return None
        self._micro = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grad_norm

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
        """Load everything but the frozen nets, which keep their current weights. A tensor a frozen net shares with a
        saved net (LoRA adapters live inside the shared base, sfplus.modules.lora) is the saved net's to load."""
        own = super().state_dict(keep_vars=True)
        saved_key = {id(v): k for k, v in own.items() if not k.startswith(self.frozen_prefixes)}
        frozen = {k: state_dict.get(saved_key.get(id(v), ""), v.detach()) for k, v in own.items()
                  if k.startswith(self.frozen_prefixes)}
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
                    more = f" ... ({len(items)})" if len(items) > 6 else ""
                    msg.append(f"  {title}: " + ", ".join(items[:6]) + more)
            raise CheckpointError("\n".join(msg))
        counters = checkpoint.get("sfplus", {}).get("counters", {})
        for name, value in counters.items():
            setattr(self, name, int(value))

def default_toy_conditioner() -> Conditioner:
    """The built-in toy task's conditioner (hashed-word text encoder, identity codec): a recipe's default."""
    return ToyConditioner()


class SingleNetModule(RecipeModule):
    """A recipe that trains one DiT (``model``) with an EMA copy (``model_ema``): diffusion training and ODE
    initialisation. Subclasses set ``init_checkpoint``, ``optimizer`` (:class:`~sfplus.modules.groups.Optimizer`) and
    ``ema_started``."""

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
        if self.init_checkpoint:
            load_weights(self.model, self.init_checkpoint)
        else:
            # Fresh weights are a function of the seed, so two runs of one config start identically.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(self.seed, "init") % (2**31))
                self.model.init_weights()
        copy_weights(self.model_ema, self.model)

    def configure_optimizers(self):
        return self.optimizer.build(self.model.parameters())

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "ema_started": int(self.ema_started)}

    ema_update_kind = "model"  # the EMA moves after every update of the one net (sfplus.modules.contract.EMAHost)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.model_ema, self.model)]

    def sample_weights(self) -> tuple[str, ...]:
        return ("model", "ema")

    def sampling_net(self) -> nn.Module:
        """The net generation reads: as :meth:`using_weights` says, else the EMA once it started."""
        name, _ = self.weights_choice()
        if name is not None:
            return self.model if name == "model" else self.model_ema
        return self.model_ema if self.ema_started else self.model
