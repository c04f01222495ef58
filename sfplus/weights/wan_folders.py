"""DiT weights from model folders (docs/wan_architecture.md, 'State dict', 'Weight files'): Wan-AI repos and diffusers
transformers.

Folders understood (the DiT only; VAE / T5 / CLIP / tokenizer files next to it are ignored):

* a Wan-AI repo as published: ``diffusion_pytorch_model.safetensors``, or shards
  ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``,
  or the pickle variants ``diffusion_pytorch_model.{bin,pth,pt}`` / ``diffusion_pytorch_model.bin.index.json``;
  a folder holding exactly one other ``*.safetensors`` file (a lightx2v / ComfyUI download) works too;
* a diffusers repo (its ``transformer/`` subfolder is used) or a transformer folder itself, recognised by
  ``config.json`` ``_class_name == "WanTransformer3DModel"`` or by diffusers key names; keys are renamed with
  :func:`sfplus.weights.diffusers_keys.diffusers_to_wan`.

Keys are always returned in Wan-original names (what ``WanDiT`` uses): FSDP / compile infixes and a prefix shared by
every key (``model.``, ``diffusion_model.``, ``model.diffusion_model.``) are removed.

Memory: files are read one at a time, so at most one shard is held besides what was already assigned;
:func:`load_folder_into` fills a model (also one built on the meta device) shard by shard after checking every key
and shape against the file headers, before any tensor is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sfplus.file_checks import load_safetensors, open_safetensors, torch_load_mapping
from sfplus.nets.presets import PRESETS
from sfplus.weights.diffusers_keys import KeyMapError, diffusers_key_to_wan
from sfplus.weights.state_dicts import CheckpointError, check_state_dict, clean_key, read_file_state_dict

__all__ = [
    "WeightFiles",
    "locate_weights",
    "iter_folder_shards",
    "folder_shapes",
    "read_folder_state_dict",
    "load_folder_into",
    "detect_preset",
    "REAL_PRESETS",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
DIFFUSERS_CLASS = "WanTransformer3DModel"
# Presets of released models; detect_preset also recognises the small test presets.
REAL_PRESETS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p")
# Shared key prefixes of repackaged files (lightx2v / ComfyUI / wrapper state dicts), longest first.
_SHARED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
_DIFFUSERS_KEY = re.compile(r"condition_embedder\.|proj_out\.|scale_shift_table$|blocks\.\d+\.(attn1|attn2|ffn\.net)\.")


@dataclass(frozen=True)
class WeightFiles:
    """Where a DiT's weights are and how to rename their keys to Wan-original names."""

    root: Path
    """Folder of the weight files (a diffusers repo's ``transformer/``)."""
    files: tuple[Path, ...]
    """Weight files, read in this order."""
    layout: str
    """``"wan"`` or ``"diffusers"`` (decided from the key names)."""
    prefix: str
    """Prefix shared by every key and removed ("" if none)."""
    config: dict | None
    """``root/config.json`` if present."""

    def wan_key(self, key: str) -> str | None:
        """Stored key -> Wan-original key (None: a tensor the model does not use, e.g. ``attn2.norm_added_q``)."""
        key = clean_key(key)[len(self.prefix):]
        if self.layout == "diffusers":
            if re.fullmatch(r"blocks\.\d+\.attn2\.norm_added_q\.weight", key):
                return None
            try:
                return diffusers_key_to_wan(key)
            except KeyMapError as err:
                raise CheckpointError(f"{self.root}: {err}") from None
        return key


def _read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def _config(folder: Path) -> dict | None:
    path = folder / "config.json"
    return _read_json(path) if path.is_file() else None


def _index_files(index: Path) -> tuple[Path, ...]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' object")
    names = list(dict.fromkeys(weight_map.values()))  # unique, in first-use order
    files = tuple(index.parent / n for n in names)
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(absent)}")
    return files


def _weight_files(folder: Path) -> tuple[Path, ...]:
    """The DiT weight files of a folder, by the diffusers / Wan-AI naming rules."""
    for suffix in (".safetensors", ".bin"):
        index = folder / f"{WEIGHTS_NAME}{suffix}.index.json"
        if index.is_file():
            return _index_files(index)
    for suffix in (".safetensors", *_PICKLE_SUFFIXES):
        single = folder / f"{WEIGHTS_NAME}{suffix}"
        if single.is_file():
            return (single,)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _index_files(indexes[0])
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return (others[0],)
    if others:
        raise CheckpointError(
            f"{folder} holds several .safetensors files and no {WEIGHTS_NAME}.safetensors(.index.json): "
            f"{', '.join(p.name for p in others)}; pass the one file to use"
        )
    raise CheckpointError(
        f"{folder} holds no DiT weights: expected {WEIGHTS_NAME}.safetensors, sharded "
        f"{WEIGHTS_NAME}-0000i-of-0000n.safetensors + {WEIGHTS_NAME}.safetensors.index.json, "
        f"{WEIGHTS_NAME}.bin/.pth, or a diffusers repo with transformer/"
    )


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with open_safetensors(path, "weights file", CheckpointError) as fh:
            return list(fh.keys())
    return list(_load_pickle(path))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    obj = torch_load_mapping(path, "weights file", CheckpointError)  # mmapped when the format allows
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _shared_prefix(keys: list[str]) -> str:
    for prefix in _SHARED_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def locate_weights(path: str | os.PathLike) -> WeightFiles:
    """Find the DiT weight files of a Wan-AI folder, a diffusers repo / transformer folder, or one ``.safetensors``.

    Reads only ``config.json``, index files and safetensors headers.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":  # pickles may be training files: read_file_state_dict handles those
            raise CheckpointError(f"{p} is not a .safetensors file or a model folder")
        root, files = p.parent, (p,)
    else:
        root = p
        if (p / "transformer").is_dir() and not any(p.glob(f"{WEIGHTS_NAME}*")):
            root = p / "transformer"  # a diffusers pipeline repo (model_index.json, transformer/, vae/, ...)
        files = _weight_files(root)
    keys = [clean_key(k) for f in files for k in _file_keys(f)]
    if not keys:
        raise CheckpointError(f"{', '.join(map(str, files))} hold no tensors")
    prefix = _shared_prefix(keys)
    config = _config(root) if p.is_dir() else None
    # The key names decide the layout: a diffusers transformer always has condition_embedder.* keys, and a
    # config.json copied next to already converted weights must not force a rename.
    layout = "diffusers" if any(_DIFFUSERS_KEY.match(k[len(prefix):]) for k in keys) else "wan"
    return WeightFiles(root=root, files=files, layout=layout, prefix=prefix, config=config)


def _read_file(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path, "weights file", CheckpointError, device=str(device))
    return {k: v.to(device) for k, v in _load_pickle(path).items()}


def iter_folder_shards(
    path: str | os.PathLike | WeightFiles, device: str | torch.device = "cpu"
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the weights file by file, as ``{wan_key: tensor}`` on ``device`` (stored dtype kept)."""
    wf = path if isinstance(path, WeightFiles) else locate_weights(path)
    device = torch.device(device)
    for f in wf.files:
        shard: dict[str, torch.Tensor] = {}
        for key, tensor in _read_file(f, device).items():
            name = wf.wan_key(key)
            if name is not None:
                shard[name] = tensor
        yield shard


def folder_shapes(path: str | os.PathLike | WeightFiles) -> dict[str, tuple[int, ...]]:
    """``{wan_key: shape}`` of every stored tensor, from the safetensors headers (pickles are mmapped)."""
    wf = path if isinstance(path, WeightFiles) else locate_weights(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in wf.files:
        if f.suffix == ".safetensors":
            with open_safetensors(f, "weights file", CheckpointError) as fh:
                items = [(k, tuple(fh.get_slice(k).get_shape())) for k in fh.keys()]
        else:
            items = [(k, tuple(v.shape)) for k, v in _load_pickle(f).items()]
        for key, shape in items:
            name = wf.wan_key(key)
            if name is None:
                continue
            if name in shapes:
                raise CheckpointError(f"{wf.root}: tensor {name!r} is stored twice (second time in {f.name})")
            shapes[name] = shape
    return shapes


def read_folder_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The DiT state dict of a Wan-AI / diffusers folder, with Wan-original key names, on the CPU.

    Shard by shard: each file's tensors move into the result, so one copy of the weights is held.
    """
    wf = locate_weights(path)
    sd: dict[str, torch.Tensor] = {}
    for shard in iter_folder_shards(wf):
        dup = sorted(set(sd) & set(shard))
        if dup:
            raise CheckpointError(f"{wf.root}: tensors stored in two files: {', '.join(dup[:8])}")
        sd.update(shard)
    return sd


def _default_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def load_folder_into(
    model: nn.Module, path: str | os.PathLike, device: str | torch.device | None = None, which: str = "ema"
) -> nn.Module:
    """Load DiT weights into ``model`` (strictly), one file at a time; works for a model built on the meta device.

    path: a Wan-AI / diffusers folder or a ``.safetensors`` file (read file by file); any other source
        :func:`sfplus.weights.state_dicts.read_file_state_dict` understands (Lightning ``.ckpt``, Self-Forcing ``.pt``,
        picked by ``which``)
        is read whole, then assigned the same way.
    device: where the tensors go; default: the model's device (CPU for a model on meta).
    Every tensor takes the dtype of the model's parameter it replaces (build the model in the dtype you want).
    Keys and shapes are checked against the file headers first: any missing / unexpected key or shape mismatch
    raises :class:`CheckpointError` listing them, before any weight is read.
    """
    device = _default_device(model) if device is None else torch.device(device)
    own = model.state_dict()
    p = Path(path)
    source = str(p)
    if p.is_dir() or p.suffix == ".safetensors":
        wf = locate_weights(p)
        check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in folder_shapes(wf).items()}, source)
        shards: Iterator[dict[str, torch.Tensor]] = iter_folder_shards(wf, device)
    else:  # Lightning / Self-Forcing training files: one read (their layout needs the whole pickle)
        sd = read_file_state_dict(p, which=which)  # type: ignore[arg-type]
        check_state_dict(model, sd, source)
        shards = iter([{k: v.to(device) for k, v in sd.items()}])

    loaded: set[str] = set()
    for shard in shards:
        to_assign, to_copy = {}, {}
        for key, tensor in shard.items():
            target = own[key]
            if target.is_meta:
                # A tensor of its own: safetensors may hand out unaligned views into one file buffer, and CPU
                # kernels round differently on unaligned data (and keep the whole buffer alive through a view).
                to_assign[key] = tensor.to(target.dtype, copy=tensor.dtype == target.dtype)
            else:
                to_copy[key] = tensor.to(target.dtype)
        shard.clear()  # drop the stored-dtype tensors before the next file
        if to_assign:
            model.load_state_dict(to_assign, strict=False, assign=True)
        if to_copy:
            model.load_state_dict(to_copy, strict=False)
        loaded.update(to_assign, to_copy)
    missing = sorted(set(own) - loaded)
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing or still_meta:
        raise CheckpointError(
            f"weights in {source} left parts of the model unloaded: {', '.join((missing or still_meta)[:8])}"
        )
    return model


# ------------------------------------------------------------------------------------------------ preset detection
def _arch_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Architecture fields readable from Wan-original tensor shapes (docs/wan_architecture.md, 'State dict')."""
    need = ("patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight", "head.head.weight")
    absent = [k for k in need if k not in shapes]
    if absent:
        raise CheckpointError(f"cannot detect the architecture: no {', '.join(absent)} among the weights")
    if "img_emb.emb_pos" in shapes:
        raise CheckpointError("weights have img_emb.emb_pos (Wan2.1 FLF2V): no sfplus preset for FLF2V")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    patch_volume = patch[0] * patch[1] * patch[2]
    img = shapes.get("img_emb.proj.1.weight")
    return {
        "dim": dim, "in_dim": in_dim, "num_layers": max(layers) + 1, "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "text_dim": shapes["text_embedding.0.weight"][1], "out_dim": shapes["head.head.weight"][0] // patch_volume,
        "patch_size": tuple(patch), "image_dim": None if img is None else img[1],
    }


def _arch_from_config(cfg: dict, source: str) -> dict:
    """Architecture fields of a Wan-original (``WanModel``) or diffusers (``WanTransformer3DModel``) config.json."""
    if cfg.get("_class_name") == DIFFUSERS_CLASS or "num_attention_heads" in cfg:
        if cfg.get("pos_embed_seq_len"):
            raise CheckpointError(f"{source}: pos_embed_seq_len set (Wan2.1 FLF2V): no sfplus preset for FLF2V")
        heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
        arch = {
            "dim": heads * head_dim if heads and head_dim else None, "num_heads": heads,
            "in_dim": cfg.get("in_channels"), "out_dim": cfg.get("out_channels"), "num_layers": cfg.get("num_layers"),
            "ffn_dim": cfg.get("ffn_dim"), "text_dim": cfg.get("text_dim"), "image_dim": cfg.get("image_dim"),
        }
        if "patch_size" in cfg:
            arch["patch_size"] = tuple(cfg["patch_size"])
    else:
        if cfg.get("model_type") == "flf2v":
            raise CheckpointError(f"{source}: model_type flf2v (Wan2.1 FLF2V): no sfplus preset for FLF2V")
        arch = {k: cfg.get(k) for k in ("dim", "num_heads", "in_dim", "out_dim", "num_layers", "ffn_dim")}
    arch = {k: v for k, v in arch.items() if v is not None or k == "image_dim"}
    if not {"dim", "num_layers", "in_dim"} <= set(arch):
        raise CheckpointError(f"{source}: config.json lacks dim / num_layers / in_dim")
    return arch


def _match_preset(arch: dict, source: str) -> str:
    hits = [
        name for name, cfg in PRESETS.items()
        if all((getattr(cfg, k) if k != "patch_size" else tuple(cfg.patch_size)) == v for k, v in arch.items())
    ]
    # Real presets first: a test preset never shadows a released model.
    hits.sort(key=lambda n: n not in REAL_PRESETS)
    if not hits:
        found = ", ".join(f"{k}={v}" for k, v in arch.items())
        known = "; ".join(
            f"{n} (dim={PRESETS[n].dim}, num_layers={PRESETS[n].num_layers}, in_dim={PRESETS[n].in_dim})"
            for n in REAL_PRESETS
        )
        raise CheckpointError(f"{source}: no WanDiT preset has {found}; known: {known}")
    return hits[0]


def _wan_shapes(sd: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    keys = [clean_key(k) for k in sd]
    prefix = _shared_prefix(keys)
    diffusers = any(_DIFFUSERS_KEY.match(k[len(prefix):]) for k in keys)
    shapes = {}
    for raw, key in zip(sd, keys):
        key = key[len(prefix):]
        if diffusers:
            try:
                key = diffusers_key_to_wan(key)
            except KeyMapError:
                continue  # unknown extras do not matter for detection
        value = sd[raw]
        shapes[key] = tuple(value.shape) if hasattr(value, "shape") else tuple(value)  # type: ignore[arg-type]
    return shapes


def detect_preset(folder_or_sd: str | os.PathLike | Mapping[str, object]) -> str:
    """Name of the WanDiT preset of some weights: "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p"
    (also the test presets "tiny", "tiny-i2v", "toy").

    folder_or_sd: a folder (its ``config.json`` — Wan ``WanModel`` or diffusers ``WanTransformer3DModel`` — else
        the tensor shapes in the weight headers), a weights file, or a state dict (tensors or shapes; Wan or
        diffusers names). I2V-14B-720P has the 480P architecture and maps to "wan2.1-i2v-14b-480p".
    Raises :class:`CheckpointError` naming the found dim / num_layers / in_dim when nothing matches.
    """
    if isinstance(folder_or_sd, Mapping):
        return _match_preset(_arch_from_shapes(_wan_shapes(folder_or_sd)), "state dict")
    p = Path(folder_or_sd)
    if p.is_dir():
        wf = locate_weights(p)
        if wf.config is not None:
            return _match_preset(_arch_from_config(wf.config, str(wf.root / "config.json")), str(p))
        return _match_preset(_arch_from_shapes(folder_shapes(wf)), str(p))
    if p.suffix == ".safetensors":
        return _match_preset(_arch_from_shapes(folder_shapes(p)), str(p))
    return _match_preset(_arch_from_shapes(_wan_shapes(read_file_state_dict(p))), str(p))
