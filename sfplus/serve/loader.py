"""Build the generator ``sfplus serve`` samples from: a recipe config (as for ``sfplus predict``) and optionally a
checkpoint, reduced to what generation reads and moved to the device.

Nets generation never reads (a distillation run's critic and teacher, an unused EMA copy) are dropped before the
module moves to the device, so serving a Self-Forcing run's checkpoint holds one DiT in GPU memory, not four.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser

from sfplus.cli import read_config
from sfplus.file_checks import check_file, torch_load_mapping
from sfplus.modules.base import RecipeModule
from sfplus.weights.checkpoints import CheckpointError

__all__ = ["load_generator", "module_from_config", "prepare_for_serving"]


def module_from_config(config: str | Path) -> RecipeModule:
    """The recipe module the config's ``model:`` section describes (class_path + init_args, ``${...}`` resolved)."""
    check_file(config, "config")
    section = read_config(config).get("model")
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{config}: no 'model:' section with a class_path (a recipe config, as for sfplus predict)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    module = instantiate(parser.parse_object({"model": section})).model
    if not isinstance(module, RecipeModule):
        raise ValueError(f"{config}: {type(module).__name__} is not an sfplus recipe module; sfplus serve generates "
                         "with sfplus.modules.DistillModule, DiffusionModule or ODEInitModule")
    return module


def load_generator(config: str | Path, ckpt_path: str | Path | None, device: torch.device) -> RecipeModule:
    """The config's module with the checkpoint's weights (or, without one, the weights its config names: e.g. a
    Self-Forcing ``.pt`` as ``teacher_checkpoint``), only the sampling net kept, in eval mode on ``device``."""
    module = module_from_config(config)
    if ckpt_path is not None and Path(ckpt_path).is_dir():
        raise CheckpointError(f"{ckpt_path} is a sharded (distributed) checkpoint folder: sfplus serve reads a "
                              "single-file checkpoint; convert it with `sfplus export` first")
    ckpt = torch_load_mapping(ckpt_path, "checkpoint", CheckpointError) if ckpt_path is not None else None
    module.configure_model()
    if ckpt is not None:
        module.on_load_checkpoint(ckpt)  # checks the keys and shapes, naming what does not match; sets counters
        module.load_state_dict(ckpt["state_dict"])
        del ckpt
    return prepare_for_serving(module, device)


def prepare_for_serving(module: RecipeModule, device: torch.device) -> RecipeModule:
    """Drop the DiTs generation does not read (e.g. the critic and the teacher), then eval mode on ``device``."""
    keep = module.sampling_net()
    for name, child in list(module.named_children()):
        if hasattr(child, "blocks") and child is not keep:
            setattr(module, name, None)
    return module.eval().requires_grad_(False).to(device)
