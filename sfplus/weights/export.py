"""``sfplus export``: write a trained generator (or its EMA) as Wan-native or diffusers safetensors.

    sfplus export --ckpt_path runs/dmd/checkpoints/last.ckpt --out exports/dmd-ema
    sfplus export --ckpt_path runs/dmd/checkpoints/last.ckpt --out dmd.safetensors --dtype bf16
    sfplus export --ckpt_path runs/dmd/checkpoints/step-2000 --out exports/dmd-diffusers --layout diffusers

Sources: a Lightning ``.ckpt`` of an sfplus module, a sharded Lightning checkpoint directory
(``torch.distributed.checkpoint`` format: ``.metadata`` + ``*.distcp`` + ``meta.pt``), and anything
:func:`sfplus.weights.checkpoints.read_dit_state_dict` reads (Wan-AI / diffusers folders, ``.safetensors``,
Self-Forcing ``.pt``). Outputs (docs/wan_architecture.md, 'Weight files'):

* ``layout="wan"``: Wan-original key names, what Wan2.1, lightx2v and ComfyUI load. ``out`` ending in
  ``.safetensors`` gives that one file; otherwise ``out`` is a folder with ``diffusion_pytorch_model.safetensors``
  (or ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``
  when ``shard_size_gb`` is set) and a Wan ``config.json`` (``_class_name: WanModel``), like the Wan-AI repos.
* ``layout="diffusers"``: a ``WanTransformer3DModel`` folder (``config.json`` + weights, sharded the same way),
  loadable with ``WanTransformer3DModel.from_pretrained(out)``.

Outputs are written under a temporary name next to ``out`` and renamed into place, so an interrupted export never
leaves a partial ``out``. Every key and shape is checked against the architecture before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from safetensors.torch import save_file

from sfplus.file_checks import torch_load
from sfplus.nets.presets import get_config
from sfplus.nets.wan import WanConfig, WanDiT
from sfplus.weights.checkpoints import CheckpointError, check_state_dict, read_dit_state_dict
from sfplus.weights.diffusers_keys import wan_to_diffusers
from sfplus.weights.lora_files import adapter_to_lora, merge_lora, write_lora_file
from sfplus.weights.sharded_checkpoint import LIGHTNING_META, is_sharded_checkpoint
from sfplus.weights.state_dicts import MODULE_PREFIXES
from sfplus.weights.wan_folders import detect_preset

__all__ = ["export_generator", "read_generator", "wan_config_json", "diffusers_config_json", "main"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS_NAME = "diffusion_pytorch_model"


class ExportError(ValueError):
    """Bad export arguments or an output that cannot be written."""


# ------------------------------------------------------------------------------------------------ reading
def _load_info(path: Path) -> dict | None:
    """The ``sfplus`` entry (net preset and overrides) of a Lightning checkpoint, if readable."""
    target = path / LIGHTNING_META if is_sharded_checkpoint(path) else path
    if not target.is_file() or target.suffix == ".safetensors":
        return None
    try:
        obj = torch_load(target, "checkpoint", CheckpointError)
    except CheckpointError:  # the info is optional (detect_preset is the fallback); the weights were read already
        return None
    info = obj.get("sfplus") if isinstance(obj, dict) else None
    return info if isinstance(info, dict) else None


def read_generator(ckpt_path: str | os.PathLike, which: Literal["ema", "model"] = "ema") -> tuple[dict, dict | None]:
    """(Wan-original state dict, the checkpoint's ``sfplus`` info or None) of any supported source."""
    p = Path(ckpt_path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if which not in MODULE_PREFIXES:
        raise ExportError(f"which must be 'ema' or 'model', got {which!r}")
    return read_dit_state_dict(p, which=which), _load_info(p)


def _resolve_config(preset: str | None, info: dict | None, sd: dict, source: str) -> WanConfig:
    if preset is not None:
        return get_config(preset)
    if info and isinstance(info.get("net"), str):
        return get_config(info["net"], **(info.get("net_overrides") or {}))
    return get_config(detect_preset(sd))


# ------------------------------------------------------------------------------------------------ configs
def wan_config_json(cfg: WanConfig) -> dict:
    """Wan-original ``config.json`` (``WanModel``, as in the Wan-AI repos: docs/wan_architecture.md,
    'Configurations')."""
    return {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": cfg.dim, "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim,
        "model_type": "i2v" if cfg.image_dim is not None else "t2v", "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "out_dim": cfg.out_dim, "text_len": cfg.text_len,
    }


def diffusers_config_json(cfg: WanConfig) -> dict:
    """``config.json`` of a diffusers ``WanTransformer3DModel`` with this architecture (docs/wan_architecture.md,
    'diffusers repos')."""
    if cfg.rope_theta != 10000.0:
        raise ExportError(f"diffusers WanTransformer3DModel has RoPE theta 10000; this model uses {cfg.rope_theta}")
    return {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
        "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "eps": cfg.eps, "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.dim if cfg.image_dim is not None else None,
        "rope_max_seq_len": cfg.rope_max_positions, "pos_embed_seq_len": None,
    }


# ------------------------------------------------------------------------------------------------ writing
def _prepare(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Cast floating tensors to ``dtype`` in place (the old copy is released key by key) and make every tensor
    contiguous with its own storage (safetensors refuses shared storages)."""
    seen: set[int] = set()
    for key in list(sd):
        t = sd[key]
        if t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        sd[key] = t


def _shards(sd: dict[str, torch.Tensor], shard_bytes: int | None) -> list[list[str]]:
    """Greedy split in key order; a tensor larger than a shard gets a shard of its own."""
    if shard_bytes is None:
        return [list(sd)]
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_weights(sd: dict[str, torch.Tensor], folder: Path, shard_bytes: int | None) -> list[str]:
    groups = _shards(sd, shard_bytes)
    if len(groups) == 1:
        save_file(sd, str(folder / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
        return [f"{WEIGHTS_NAME}.safetensors"]
    names, weight_map = [], {}
    for i, keys in enumerate(groups, start=1):
        name = f"{WEIGHTS_NAME}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, f"{WEIGHTS_NAME}.safetensors.index.json"]


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is swapped out first and deleted afterwards."""
    old = None
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} exists; pass overwrite=True to replace it")
        if out.is_file() and tmp.is_file():
            os.replace(tmp, out)
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def export_generator(
    ckpt_path: str,
    out: str,
    which: Literal["ema", "model"] = "ema",
    layout: Literal["wan", "diffusers"] = "wan",
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    shard_size_gb: float | None = None,
    preset: str | None = None,
    overwrite: bool = False,
    merge: bool = False,
    base: str | None = None,
) -> Path:
    """Export the generator of a checkpoint as Wan-original or diffusers safetensors.

    Args:
        ckpt_path: Lightning ``.ckpt`` file, sharded Lightning checkpoint directory (torch.distributed.checkpoint),
            Self-Forcing ``.pt``, ``.safetensors``, Wan-AI or diffusers folder.
        out: output folder; with layout "wan", a path ending in ``.safetensors`` writes that single file (a LoRA,
            unless merged, is always one ``.safetensors`` file, in either layout).
        which: "ema" (the EMA generator; falls back to the raw one when the checkpoint has no EMA) or "model".
        layout: "wan" (original key names: Wan2.1, lightx2v, ComfyUI) or "diffusers" (WanTransformer3DModel).
        dtype: dtype of the floating tensors written.
        shard_size_gb: split the weights into shards of at most this many GB (1e9 bytes) plus an index json.
        preset: architecture (a preset name) when the checkpoint does not say it; default: the checkpoint's
            ``sfplus`` entry, else detected from the tensor shapes.
        overwrite: replace an existing ``out``.
        merge: a LoRA distillation's checkpoint (``lora:``, :mod:`sfplus.modules.lora`) holds adapters only. By
            default its generator (EMA) adapter is written as one LoRA ``.safetensors`` file in ``layout`` (``wan``: the
            ``diffusion_model.`` keys diffusers' ``WanPipeline.load_lora_weights`` and ComfyUI read;
            ``diffusers``: ``transformer.`` keys); with ``merge``, merged into the base as full weights instead.
        base: the base weights to merge into (default: the checkpoint's teacher file).

    Returns:
        The written path.
    """
    out_path = Path(out)
    if layout not in ("wan", "diffusers"):
        raise ExportError(f"layout must be 'wan' or 'diffusers', got {layout!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    single_file = out_path.suffix == ".safetensors"
    if shard_size_gb is not None and shard_size_gb <= 0:
        raise ExportError(f"shard_size_gb must be positive, got {shard_size_gb}")
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} exists; pass overwrite=True to replace it")

    sd, info = read_generator(ckpt_path, which)
    if any(".lora_A." in k for k in sd):
        if not merge:  # a LoRA is one file in either layout
            if shard_size_gb is not None:
                raise ExportError("a LoRA is one file: shard_size_gb does not apply (merge=True writes full weights)")
            return _export_lora(sd, info, out_path, layout, dtype, overwrite, str(ckpt_path))
        sd = _merged(sd, info, base, str(ckpt_path))
    if single_file and (layout != "wan" or shard_size_gb is not None):
        raise ExportError(
            f"out={out} is one .safetensors file: only layout='wan' without shard_size_gb writes one file"
        )
    cfg = _resolve_config(preset, info, sd, str(ckpt_path))
    with torch.device("meta"):
        skeleton = WanDiT(cfg)
    check_state_dict(skeleton, sd, str(ckpt_path))  # never export weights that do not fit the architecture
    _prepare(sd, DTYPES[dtype])
    if layout == "diffusers":
        sd = wan_to_diffusers(sd)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if single_file:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            save_file(sd, str(tmp), metadata={"format": "pt"})
            _replace(tmp, out_path, overwrite)
        finally:
            tmp.unlink(missing_ok=True)
        return out_path

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        shard_bytes = None if shard_size_gb is None else max(1, int(shard_size_gb * 1e9))
        _write_weights(sd, tmp, shard_bytes)
        config = wan_config_json(cfg) if layout == "wan" else diffusers_config_json(cfg)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _replace(tmp, out_path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_path


def _lora_info(info: dict | None, source: str) -> dict:
    lora = (info or {}).get("lora")
    if not isinstance(lora, dict) or "scale" not in lora:
        raise ExportError(f"{source} holds LoRA adapters but no 'lora' entry (scale) in its sfplus info")
    return lora


def _export_lora(sd: dict, info: dict | None, out: Path, layout: str, dtype: str, overwrite: bool,
                 source: str) -> Path:
    """The generator's adapter as one LoRA file (sfplus.weights.lora_files)."""
    if out.suffix != ".safetensors":
        raise ExportError(f"a LoRA is one file: out must end in .safetensors, got {out}")
    lora = adapter_to_lora(sd, _lora_info(info, source)["scale"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_lora_file(lora, tmp, layout, DTYPES[dtype])
        _replace(tmp, out, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _merged(sd: dict, info: dict | None, base: str | None, source: str) -> dict:
    """Full Wan weights: the base (``base`` or the checkpoint's teacher file) + the adapter."""
    lora_info = _lora_info(info, source)
    base = base or lora_info.get("base")
    if not base:
        raise ExportError(f"{source}: merging a LoRA needs the base weights; pass base=PATH")
    return merge_lora(read_dit_state_dict(base), adapter_to_lora(sd, lora_info["scale"]), f"LoRA of {source}")


def main(argv: list[str] | None = None, exit_on_error: bool = True) -> None:
    """Command-line entry (``sfplus export ...``)."""

    path = CLI(export_generator, args=argv, as_positional=False, exit_on_error=exit_on_error)
    print(f"exported {path}")


if __name__ == "__main__":
    main()
