"""Single weight files and the key / shape checks every DiT reader shares (a leaf: imports no other weight reader).

:mod:`sfplus.weights.checkpoints` (any source), :mod:`sfplus.weights.wan_folders` (model folders) and
:mod:`sfplus.weights.sharded_checkpoint` (``torch.distributed.checkpoint`` directories) all build on this module, so
none of them needs another.

Files understood by :func:`read_file_state_dict`:

* a Lightning checkpoint of an sfplus module (``.ckpt``): the sub-module picked by ``which`` (``ema`` →
  ``generator_ema.`` / ``model_ema.``, ``model`` → ``generator.`` / ``model.``);
* a single ``.safetensors`` file in Wan-original layout;
* a Self-Forcing / Self-Forcing-Plus ``.pt`` training file (``generator`` / ``generator_ema`` entries, ``model.``
  prefix, FSDP ``_fsdp_wrapped_module.`` and ``_orig_mod.`` infixes);
* a plain ``.pt``/``.pth`` state dict in Wan-original layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sfplus.file_checks import DamagedFileError, load_safetensors, torch_load_mapping

__all__ = ["CheckpointError", "MODULE_PREFIXES", "Which", "check_state_dict", "clean_key", "read_file_state_dict"]

Which = Literal["ema", "model"]

MODULE_PREFIXES: dict[str, tuple[str, ...]] = {
    "ema": ("generator_ema.", "model_ema.", "generator.", "model."),
    "model": ("generator.", "model.", "generator_ema.", "model_ema."),
}
"""Prefixes of the DiT inside sfplus modules' state dicts, in order of preference, for each ``which``."""

_NOISE_INFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


class CheckpointError(DamagedFileError):
    """A weights file is missing, unreadable, or does not match the model."""


def clean_key(key: str) -> str:
    """``key`` without the infixes FSDP1, activation checkpointing and ``torch.compile`` add to parameter names."""
    for infix in _NOISE_INFIXES:
        key = key.replace(infix, "")
    return key


def _take_prefix(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str]:
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub, prefix
    return sd, ""


def read_file_state_dict(path: str | os.PathLike, which: Which = "ema") -> dict[str, torch.Tensor]:
    """Return the DiT state dict stored in the single file ``path`` with Wan-original key names."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        return {clean_key(k): v for k, v in load_safetensors(p, "checkpoint", CheckpointError).items()}
    obj = torch_load_mapping(p, "checkpoint", CheckpointError)  # weights_only; damaged files: one line
    if "state_dict" in obj:  # Lightning checkpoint
        sd, _ = _take_prefix(obj["state_dict"], MODULE_PREFIXES[which])
        return {clean_key(k): v for k, v in sd.items()}
    # Self-Forcing training files: {"generator": ..., "generator_ema": ..., "critic": ...}
    order = ("generator_ema", "generator", "model") if which == "ema" else ("generator", "model", "generator_ema")
    for name in order:
        if name in obj and isinstance(obj[name], dict):
            obj = obj[name]
            break
    sd = {clean_key(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model.") :]: v for k, v in sd.items()}
    if not sd:
        raise CheckpointError(f"{p} holds no tensors")
    return sd


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
