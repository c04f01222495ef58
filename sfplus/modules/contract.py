"""What callbacks and recipe modules may expect of each other, written down as Protocols (checked at run time with
``isinstance``, so a module or callback that breaks the contract gets an error naming it, not an AttributeError deep
in a hook)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class EMAHost(Protocol):
    """A module whose nets the :class:`sfplus.callbacks.EMA` callback averages.

    ``iteration`` is the module's own counter the EMA's ``start_iteration`` refers to; ``last_update`` names the
    optimizer update the batch just made (``None`` inside an accumulated update); the EMA moves after updates of
    kind ``ema_update_kind``; ``ema_started`` is saved in checkpoints (generation reads the EMA only once it is set).
    """

    iteration: int
    last_update: str | None
    ema_started: bool
    ema_update_kind: str

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA copy, live net) pairs, identically built and sharded."""
        ...


@runtime_checkable
class VideoSource(Protocol):
    """A module that generates videos for prompts (what :class:`sfplus.callbacks.SampleLogger` and ``sfplus serve``
    call; batch generation goes through the same methods). :class:`sfplus.modules.base.RecipeModule` is one."""

    iteration: int

    def generate(self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int,
                 image: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, uint8 videos [B, T, H, W, 3]); each video a function of its prompt, seed, index and sample."""
        ...

    def generate_latents(self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int,
                         image: dict | None = None) -> torch.Tensor:
        """``generate``'s latents [B, C, F, H, W], not decoded."""
        ...

    def stream(self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int,
               image: dict | None = None) -> Iterator[torch.Tensor]:
        """``generate``'s videos as uint8 frame blocks [B, T_n, H, W, 3], each as soon as it is decoded."""
        ...

    def sample_weights(self) -> tuple[str, ...]:
        """Names ``using_weights`` accepts (e.g. generator, ema, teacher)."""
        ...

    def using_weights(self, name: str, **options) -> AbstractContextManager[None]:
        """Generate from the weights ``name`` inside the ``with`` block."""
        ...


@runtime_checkable
class OutputIndex(Protocol):
    """A predict-time writer that knows which outputs already exist (so ``predict_step`` skips them and an
    interrupted batch-generation job resumes); :class:`sfplus.callbacks.VideoWriter` is one."""

    def exists(self, text: str, index: int, sample: int) -> bool:
        """Whether the output of prompt ``index``'s ``sample``-th video (prompt ``text``) is complete."""
        ...
