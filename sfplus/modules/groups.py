"""Typed groups of recipe settings: what LightningCLI checks, fills with defaults and prints with ``--print_config``.

A recipe YAML writes each group as a nested mapping (``scale: {activation_checkpointing: true}``); jsonargparse
builds the dataclass and refuses unknown keys and wrong types, naming them. Python callers may pass the dataclass or
a plain dict (:func:`as_group`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, TypeVar

import torch

from sfplus.flow import warp_timesteps

Dtype = Literal["bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class Scale:
    """How a recipe's nets are laid out on the hardware (applied by :mod:`sfplus.parallel`).

    Args:
        activation_checkpointing: recompute every transformer block of the trained nets in backward.
        param_dtype: compute dtype of sharded weights (FSDP2 gathers them in it); master weights, EMA and gradient
            reductions stay fp32. On one device, ``trainer.precision`` sets the compute dtype instead.
        frozen_dtype: storage dtype of the frozen teacher (None: as built, fp32).
        compile: ``torch.compile`` every transformer block (costs 15-30 s of compilation at start).
        fp8: predict only — FP8 block linears (sfplus.nets.fp8); refused in fit (they have no backward).
        accumulate_grad_batches: micro-batches per optimizer update; N GPUs accumulating k reproduce N*k GPUs.
        sequence_parallel: ranks that split each sample's tokens (Ulysses, docs/parallelism.md); must equal the
            ModelParallelStrategy's ``tensor_parallel_size`` and divide the heads and the tokens per frame.
    """

    activation_checkpointing: bool = False
    param_dtype: Dtype = "bf16"
    frozen_dtype: Dtype | None = None
    compile: bool = False
    fp8: bool = False
    accumulate_grad_batches: int = 1
    sequence_parallel: int = 1

    # Frozen: one instance is the default of every recipe's signature, so nothing may change it in place.

    def __post_init__(self) -> None:
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"scale.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        if self.sequence_parallel < 1:
            raise ValueError(f"scale.sequence_parallel must be >= 1, got {self.sequence_parallel}")


@dataclass
class GAN:
    """DMD2's adversarial term on the critic's features (a discriminator head with register tokens).

    Args:
        g_weight: weight of the generator's adversarial loss (reference ``gan_g_weight``).
        d_weight: weight of the discriminator loss in the critic update (reference ``gan_d_weight``).
        relativistic: relativistic pairing of real and fake logits.
        r1_weight, r2_weight: approximate R1 / R2 penalties (0: off); r1_sigma, r2_sigma: their input noise.
        blocks: critic blocks whose outputs the head reads (negative: from the end).
        head_lr_multiplier: the head's learning rate relative to the critic's.
        tokens_per_block: register tokens per read block.
        dmd_weight: weight of the distribution-matching loss next to the adversarial one.
        warmup_steps: critic updates during which only the head learns and the generator waits.
        ffn_dim: FFN width of the head's attention blocks (the reference's 8192 at any critic width; None: 4 x the
            critic's width).
        register_norm_weight: the register tokens' RMSNorm has a learnable weight (the reference's).
        norm2_affine: the head blocks' pre-FFN LayerNorm has weight and bias (the reference's has none).
    The last three default to the reference's head. A checkpoint written by sfplus before they existed holds
    ``ffn_dim: null, register_norm_weight: false, norm2_affine: true``: set those to resume it (loading names them).
    """

    g_weight: float = 1e-2
    d_weight: float = 1e-2
    relativistic: bool = False
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01
    r2_sigma: float = 0.01
    blocks: list[int] = field(default_factory=lambda: [-1])
    head_lr_multiplier: float = 1.0
    tokens_per_block: int = 1
    dmd_weight: float = 1.0
    warmup_steps: int = 0
    ffn_dim: int | None = 8192
    register_norm_weight: bool = True
    norm2_affine: bool = False

    def __post_init__(self) -> None:
        if self.ffn_dim is not None and (isinstance(self.ffn_dim, bool) or not isinstance(self.ffn_dim, int)
                                         or self.ffn_dim < 1):
            raise ValueError(f"gan.ffn_dim must be a positive int or null (4 x the critic's width), got "
                             f"{self.ffn_dim!r}")


@dataclass(frozen=True)
class FewStepSchedule:
    """The few-step generator's timesteps.

    Args:
        steps: timesteps before warping, decreasing (reference ``denoising_step_list``); zeros are dropped.
        warp: map the steps through the shift ([1000, 750, 500, 250] at shift 5 -> [1000, 937.5, 833.3, 625])
            (reference ``warp_denoising_step``).
        shift: the Wan / SD3 timestep shift of the warp; DistillModule also shifts its score timesteps by it
            (reference ``timestep_shift``).
    """

    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)  # a tuple: the default instance is shared
    warp: bool = True
    shift: float = 5.0

    def __post_init__(self) -> None:
        positive = [float(s) for s in self.steps if s > 0]
        if not positive or any(b >= a for a, b in zip(positive, positive[1:])):
            raise ValueError(f"schedule.steps must be positive and decreasing, got {list(self.steps)}")
        if self.shift <= 0:
            raise ValueError(f"schedule.shift must be > 0, got {self.shift}")

    @property
    def unwarped(self) -> list[float]:
        """The positive steps as written."""
        return [float(s) for s in self.steps if s > 0]

    @property
    def timesteps(self) -> list[float]:
        """The timesteps the generator runs at (warped when ``warp``)."""
        return warp_timesteps(self.unwarped, self.shift) if self.warp else self.unwarped


@dataclass(frozen=True)
class Optimizer:
    """AdamW for one trained net, with gradient-norm clipping.

    Args:
        lr: learning rate.
        betas: AdamW betas (the reference's distillation runs use [0.0, 0.999]).
        weight_decay: decoupled weight decay.
        max_grad_norm: clip the net's gradient norm to this (reference ``max_grad_norm_generator`` /
            ``max_grad_norm_critic``).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0

    def __post_init__(self) -> None:
        if self.lr < 0 or self.max_grad_norm <= 0:
            raise ValueError(f"optimizer lr must be >= 0 and max_grad_norm > 0, got lr={self.lr}, "
                             f"max_grad_norm={self.max_grad_norm}")

    def build(self, params) -> torch.optim.AdamW:
        """AdamW over ``params`` (an iterable of tensors or of param-group dicts)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)


@dataclass(frozen=True)
class ScoreTimesteps:
    """Where DMD / SiD evaluate the scores (docs/algorithms.md, 'Score timesteps'): a raw integer timestep drawn
    uniformly in [low, high), shifted by ``schedule.shift`` and clamped to [20, 980].

    Args:
        min: ``low`` (reference ``min_score_timestep``); ``high`` is 1000.
        above_exit_step: ``low`` is the exit step's next timestep instead, unwarped (reference ``ts_schedule``).
        below_exit_step: ``high`` is the exit step's timestep, unwarped (reference ``ts_schedule_max``).
    """

    min: int = 0
    above_exit_step: bool = False
    below_exit_step: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.min < 1000:
            raise ValueError(f"score_timesteps.min must lie in [0, 1000), got {self.min}")


G = TypeVar("G")


def as_group(cls: type[G], value: G | dict | None, name: str, base: G | None = None) -> G | None:
    """``value`` as a ``cls`` instance. A dict (Python callers, jsonargparse's partial groups) is checked for unknown
    keys by name and fills in ``base`` (the signature's default instance) where given, else the class defaults."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of {cls.__name__} settings, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; known: {sorted(known)}")
    return replace(base, **value) if base is not None else cls(**value)


#: WanDiT block linears a LoRA may adapt (names inside ``blocks.{i}.``; the Wan-original key names).
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
                "ffn.0", "ffn.2")
#: What the field's Wan LoRAs adapt (lightx2v's StepDistill LoRAs, diffusers' Wan LoRA loader): attention + FFN.
DEFAULT_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass
class LoRA:
    """Distil into low-rank adapters on ONE frozen base (:mod:`sfplus.modules.lora`, through peft): the teacher is the
    base with adapters off; the generator and the critic are the base with their own adapter on.

    Each adapted linear ``W x`` becomes ``W x + (alpha / rank) · B A x`` with ``A`` [rank, in] and ``B`` [out, rank]
    (``B`` starts at zero, so generator and critic start as the teacher).

    Args:
        rank: rank of every adapter (the generator's and the critic's).
        alpha: LoRA scale numerator (None: ``rank``, i.e. scale 1).
        dropout: dropout on the adapters' input (0 keeps training a function of the seeded noise streams alone).
        targets: block linears to adapt, by Wan name inside ``blocks.{i}.`` (:data:`LORA_TARGETS`); I2V nets may add
            ``cross_attn.k_img`` and ``cross_attn.v_img`` (both or neither).
        generator_init: a LoRA file (Wan/ComfyUI ``diffusion_model.`` or diffusers ``transformer.`` layout, what
            ``sfplus export`` writes from a LoRA checkpoint) to start the generator's adapter from (and its EMA);
            None: fresh.
    """

    rank: int = 64
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    generator_init: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive (or null for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = list(self.targets)
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {unknown or '[]'} not adaptable; choose from {list(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets lists a linear twice: {self.targets}")
        image = {"cross_attn.k_img", "cross_attn.v_img"} & set(self.targets)
        if len(image) == 1:  # diffusers reads a Wan LoRA's image branch only when both are there; else it refuses
            raise ValueError(f"lora.targets adapts {image.pop()} alone: adapt cross_attn.k_img and cross_attn.v_img "
                             "together (diffusers' Wan LoRA loader cannot load one without the other)")

    @property
    def scale(self) -> float:
        """The factor on ``B A x``: ``alpha / rank``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank
