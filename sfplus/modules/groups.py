"""Typed groups of recipe settings: what LightningCLI checks, fills with defaults and prints with ``--print_config``.

A recipe YAML writes each group as a nested mapping (``scale: {activation_checkpointing: true}``); jsonargparse
builds the dataclass and refuses unknown keys and wrong types, naming them. Python callers may pass the dataclass or
a plain dict (:func:`as_group`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, TypeVar

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
    """

    activation_checkpointing: bool = False
    param_dtype: Dtype = "bf16"
    frozen_dtype: Dtype | None = None
    compile: bool = False
    fp8: bool = False
    accumulate_grad_batches: int = 1

    # Frozen: one instance is the default of every recipe's signature, so nothing may change it in place.

    def __post_init__(self) -> None:
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"scale.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")


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


G = TypeVar("G")


def as_group(cls: type[G], value: G | dict | None, name: str) -> G | None:
    """``value`` as a ``cls`` instance: dicts (Python callers, old configs) are checked for unknown keys by name."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of {cls.__name__} settings, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; known: {sorted(known)}")
    return cls(**value)
