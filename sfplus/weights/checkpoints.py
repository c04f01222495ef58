"""Loading DiT weights from wherever users keep them, always with ``weights_only`` / safetensors.

Sources understood:

* a directory: a sharded Lightning checkpoint (:mod:`sfplus.weights.sharded_checkpoint`) or a Wan-AI / diffusers
  model folder (:mod:`sfplus.weights.wan_folders`);
* a single file (:func:`sfplus.weights.state_dicts.read_file_state_dict`): a Lightning ``.ckpt`` of an sfplus module
  (the sub-module picked by ``which``: ``ema`` → ``generator_ema.`` / ``model_ema.``, ``model`` → ``generator.`` /
  ``model.``), a ``.safetensors`` file in Wan-original layout, a Self-Forcing / Self-Forcing-Plus ``.pt`` training
  file, or a plain ``.pt``/``.pth`` state dict.

``CheckpointError`` and ``check_state_dict`` live in the leaf :mod:`sfplus.weights.state_dicts` and are
re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sfplus.weights import sharded_checkpoint, wan_folders
from sfplus.weights.state_dicts import CheckpointError, Which, check_state_dict, read_file_state_dict

__all__ = ["CheckpointError", "Which", "check_state_dict", "load_dit_weights", "read_dit_state_dict"]


def read_dit_state_dict(path: str | os.PathLike, which: Which = "ema") -> dict[str, torch.Tensor]:
    """Return the DiT state dict stored in ``path`` (a file or a directory) with Wan-original key names."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir():
        if sharded_checkpoint.is_sharded_checkpoint(p):  # a sharded Lightning checkpoint (ModelParallelStrategy)
            return sharded_checkpoint.read_sharded_checkpoint(p, which)
        return wan_folders.read_folder_state_dict(p)  # Wan-AI / diffusers folders
    return read_file_state_dict(p, which)


def load_dit_weights(model: nn.Module, path: str | os.PathLike, which: Which = "ema") -> nn.Module:
    """Load the DiT weights in ``path`` into ``model`` strictly (clear error on any mismatch)."""
    sd = read_dit_state_dict(path, which)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    return model
