"""Weights in and out: every DiT / VAE weight format users hold, read with safe loaders and checked by key and shape.

* :mod:`~sfplus.weights.checkpoints` — :func:`read_dit_state_dict` / :func:`load_dit_weights` from any source: a file,
  a Wan-AI or diffusers model folder, a sharded Lightning checkpoint directory;
* :mod:`~sfplus.weights.state_dicts` — single weight files and the key / shape checks all readers share (the leaf);
* :mod:`~sfplus.weights.wan_folders` — Wan-AI and diffusers model folders, shard by shard;
* :mod:`~sfplus.weights.sharded_checkpoint` — ``torch.distributed.checkpoint`` directories;
* :mod:`~sfplus.weights.diffusers_keys`, :mod:`~sfplus.weights.vae_keys` — Wan <-> diffusers key maps;
* :mod:`~sfplus.weights.export` — ``sfplus export``: a trained generator as Wan-native or diffusers safetensors
  (imported on its own: it builds nets).
"""

from sfplus.weights.checkpoints import load_dit_weights, read_dit_state_dict
from sfplus.weights.diffusers_keys import KeyMapError, diffusers_to_wan, wan_to_diffusers
from sfplus.weights.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from sfplus.weights.state_dicts import CheckpointError, check_state_dict, read_file_state_dict
from sfplus.weights.vae_keys import VAEKeyError, diffusers_vae_to_wan, wan_vae_to_diffusers
from sfplus.weights.wan_folders import detect_preset, locate_weights, read_folder_state_dict

__all__ = [
    "CheckpointError",
    "KeyMapError",
    "VAEKeyError",
    "check_state_dict",
    "detect_preset",
    "diffusers_to_wan",
    "diffusers_vae_to_wan",
    "is_sharded_checkpoint",
    "load_dit_weights",
    "locate_weights",
    "read_dit_state_dict",
    "read_file_state_dict",
    "read_folder_state_dict",
    "read_sharded_checkpoint",
    "wan_to_diffusers",
    "wan_vae_to_diffusers",
]
