"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sfplus.nets.presets import build_dit

#: The tiny preset on 3-channel pixel "latents" (the toy codec).
TINY = {"in_dim": 3, "out_dim": 3}


def write_tiny_teacher(path: Path, overrides: dict | None = None) -> str:
    """Save a seeded tiny teacher (preset fields ``overrides``, default ``TINY``) to ``path`` (safetensors) and
    return the path as a string.

    ``init_weights`` zeroes the head; it gets small random weights so the teacher's output depends on its input.
    """
    torch.manual_seed(0)
    net = build_dit("tiny", **(TINY if overrides is None else overrides))
    net.init_weights()
    torch.nn.init.normal_(net.head.head.weight, std=0.02)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)
