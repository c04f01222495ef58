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


def write_run_config(root: Path, module: str = "sfplus.modules.DiffusionModule", every_n_iterations: int | None = 1,
                     name: str = "config.yaml", **model_args) -> Path:
    """A tiny toy run as a user writes it for ``sfplus fit``: an ``AtomicCheckpoint`` into ``<root>/run/checkpoints``
    and no ``Preemption`` callback (the CLI adds one). Returns the YAML path; a few seconds per 2 steps on a CPU."""
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root / "run"),
            "callbacks": [{"class_path": "sfplus.callbacks.AtomicCheckpoint",
                           "init_args": {"every_n_iterations": every_n_iterations, "keep_last": 3}}],
        },
        "model": {"class_path": module, "init_args": {
            "net": "tiny", "net_overrides": dict(TINY),
            "conditioner": {"class_path": "sfplus.conditioning.ToyConditioner",
                            "init_args": {"text_dim": 16, "text_len": 8}},
            "video_shape": [3, 2, 8, 8], **model_args}},
        "data": {"class_path": "sfplus.datamodules.ToyDataModule",
                 "init_args": {"frames": 2, "height": 8, "width": 8, "size": 3, "batch_size": 2, "length": 10_000,
                               "colours": ["red", "blue"], "directions": ["left", "up"]}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path
