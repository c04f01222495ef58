"""Frozen CLIP image encoder for Wan2.1 I2V: ViT-H/14 vision tower through transformers.

Wan conditions I2V on the output of the 31st of the 32 ViT blocks (``use_31_block=True``): CLS + 16x16 patch tokens, no
final LayerNorm, no projection -> ``[B, 257, 1280]`` (docs/wan_architecture.md, 'CLIP image encoder'). This module drops
the last block of a ``transformers.CLIPVisionModel`` and returns its ``last_hidden_state``, which is exactly HF's
``hidden_states[-2]`` of the full tower, without computing the block nobody uses.

Weights: the ``visual.*`` part of Wan's open-clip ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` through
the key map of docs/wan_architecture.md, 'CLIP key map' (the XLM-RoBERTa text tower and ``log_scale`` are ignored), or
an HF folder (e.g. the ``image_encoder/`` of the ``-Diffusers`` repos, which holds laion's ViT-H/14 rather than Wan's
file).

Preprocessing follows Wan, not ``CLIPImageProcessor``: images in [-1, 1] are squashed (no crop) to 224x224 with bicubic
interpolation, mapped to [0, 1] and normalised with the CLIP mean/std (docs/wan_architecture.md, 'CLIP preprocessing').
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfplus.nets.text import EncoderCheckpointError, check_keys, hf_dtype_kwarg, read_state_dict

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipImageEncoder",
    "clip_vision_config_from_wan",
    "clip_vit_h14_config",
    "hf_clip_to_wan",
    "preprocess_images",
    "wan_clip_to_hf",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------------------------
# Wan open-clip visual <-> HF CLIPVisionModel key map (docs/wan_architecture.md, 'CLIP key map')
# --------------------------------------------------------------------------------------------------------------

# Per-block renames (after "visual.transformer.{i}." / "vision_model.encoder.layers.{i}."), except to_qkv.
_CLIP_BLOCK_MAP = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_CLIP_BLOCK_MAP_INV = {v: k for k, v in _CLIP_BLOCK_MAP.items()}
_CLIP_TOP_MAP = {
    "visual.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "vision_model.pre_layrnorm.weight",  # (sic) HF's spelling
    "visual.pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "visual.post_norm.weight": "vision_model.post_layernorm.weight",
    "visual.post_norm.bias": "vision_model.post_layernorm.bias",
}
_CLIP_TOP_MAP_INV = {v: k for k, v in _CLIP_TOP_MAP.items()}
_WAN_BLOCK_RE = re.compile(r"visual\.transformer\.(\d+)\.(.+)")
_HF_BLOCK_RE = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")
_QKV = ("q_proj", "k_proj", "v_proj")  # order of the thirds of Wan's fused to_qkv


def wan_clip_to_hf(sd: Mapping[str, Tensor], *, source: str = "Wan CLIP state dict") -> dict[str, Tensor]:
    """Rename the ``visual.*`` keys of Wan's open-clip state dict to HF CLIP vision keys (``vision_model.*``).

    Keys outside ``visual.`` (the text tower ``textual.*``, ``log_scale``) are ignored. The fused
    ``to_qkv`` is split in three (q, k, v); ``cls_embedding`` [1,1,D] -> [D]; ``pos_embedding`` [1,N,D] ->
    [N,D]; ``head`` [D,P] -> ``visual_projection.weight`` [P,D] (used only by ``...WithProjection`` models).
    Unknown ``visual.*`` keys raise ``EncoderCheckpointError`` (all listed).
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if not key.startswith("visual."):
            continue
        if key in _CLIP_TOP_MAP:
            out[_CLIP_TOP_MAP[key]] = value
        elif key == "visual.cls_embedding":
            out["vision_model.embeddings.class_embedding"] = value.reshape(value.shape[-1])
        elif key == "visual.pos_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = value.reshape(value.shape[-2:])
        elif key == "visual.head":
            out["visual_projection.weight"] = value.t()
        elif m := _WAN_BLOCK_RE.fullmatch(key):
            prefix, rest = f"vision_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest in _CLIP_BLOCK_MAP:
                out[prefix + _CLIP_BLOCK_MAP[rest]] = value
            elif rest in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                if value.shape[0] % 3:
                    raise EncoderCheckpointError(f"{source}: {key} has {value.shape[0]} rows, not a multiple of 3")
                for name, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise EncoderCheckpointError(
            f"{source}: keys not in the Wan CLIP visual layout ({len(unknown)}): {sorted(unknown)}"
        )
    return out


def hf_clip_to_wan(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``wan_clip_to_hf``. Accepts keys with or without the ``vision_model.`` prefix (transformers
    5 dropped it from ``CLIPVisionModel``'s own state dict; files keep it)."""
    sd = {
        (k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k): v
        for k, v in sd.items()
    }
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in _CLIP_TOP_MAP_INV:
            out[_CLIP_TOP_MAP_INV[key]] = value
        elif key == "vision_model.embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif key == "visual_projection.weight":
            out["visual.head"] = value.t()
        elif m := _HF_BLOCK_RE.fullmatch(key):
            prefix, rest = f"visual.transformer.{m.group(1)}.", m.group(2)
            if rest in _CLIP_BLOCK_MAP_INV:
                out[prefix + _CLIP_BLOCK_MAP_INV[rest]] = value
            elif (parts := rest.split(".")) and len(parts) == 3 and parts[0] == "self_attn" and parts[1] in _QKV:
                qkv.setdefault((prefix, parts[2]), {})[parts[1]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (prefix, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise EncoderCheckpointError(f"{prefix}: incomplete q/k/v {kind} set: {sorted(parts)}")
        out[f"{prefix}attn.to_qkv.{kind}"] = torch.cat([parts[n] for n in _QKV], dim=0)
    if unknown:
        raise EncoderCheckpointError(f"keys not in the HF CLIP vision layout ({len(unknown)}): {sorted(unknown)}")
    return out


def clip_vit_h14_config():
    """``CLIPVisionConfig`` of the ViT-H/14 tower in Wan's open-clip file (all 32 blocks)."""
    # local: transformers model classes load on first use; only the Wan I2V encoder needs them
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",  # exact GELU; CLIPVisionConfig's default is quick_gelu
        layer_norm_eps=1e-5,
        projection_dim=1024,
    )


def clip_vision_config_from_wan(
    sd: Mapping[str, Tensor], *, num_heads: int = 16, source: str = "Wan CLIP state dict"
):
    """Read a ``CLIPVisionConfig`` off the shapes of Wan's ``visual.*`` keys.

    The head count is not visible in the shapes (the fused qkv is [3D, D]); Wan's ViT-H/14 uses 16 heads of
    80, the default. For the real file this equals ``clip_vit_h14_config()``.
    """
    # local: transformers model classes load on first use; only the Wan I2V encoder needs them
    from transformers import CLIPVisionConfig

    needed = ["visual.patch_embedding.weight", "visual.pos_embedding", "visual.transformer.0.mlp.0.weight"]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise EncoderCheckpointError(f"{source}: cannot read the CLIP vision config, missing keys: {absent}")
    hidden, _, patch, _ = sd["visual.patch_embedding.weight"].shape
    grid = round((sd["visual.pos_embedding"].shape[-2] - 1) ** 0.5)
    if grid * grid + 1 != sd["visual.pos_embedding"].shape[-2] or hidden % num_heads:
        raise EncoderCheckpointError(
            f"{source}: visual.pos_embedding {tuple(sd['visual.pos_embedding'].shape)} is not 1 + a square grid, "
            f"or width {hidden} is not a multiple of {num_heads} heads"
        )
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _WAN_BLOCK_RE.fullmatch(k)))
    head = sd.get("visual.head")
    return CLIPVisionConfig(
        hidden_size=int(hidden),
        intermediate_size=int(sd["visual.transformer.0.mlp.0.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        image_size=int(grid * patch),
        patch_size=int(patch),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=int(head.shape[1]) if head is not None else 1024,
    )


# --------------------------------------------------------------------------------------------------------------
# Preprocessing (docs/wan_architecture.md, 'CLIP preprocessing')
# --------------------------------------------------------------------------------------------------------------


def preprocess_images(images: Tensor, size: int = 224) -> Tensor:
    """Wan's CLIP preprocessing: [B, 3, H, W] in [-1, 1] -> float32 [B, 3, size, size], CLIP-normalised.

    Bicubic resize to size x size (aspect not kept, no crop, no antialias, no clamp: bicubic overshoot is
    passed on as in Wan), then x * 0.5 + 0.5 -> [0, 1], then (x - mean) / std.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------


def _fill_meta_buffers(model: nn.Module) -> None:
    # A model built on the meta device gets its parameters from the state dict, but non-persistent buffers
    # (CLIP's position_ids) are not in any state dict: rebuild them.
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"buffer {name} of {type(module).__name__} was left on the meta device")
            module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


class ClipImageEncoder(nn.Module):
    """Frozen CLIP vision tower: images [B, 3, H, W] in [-1, 1] -> float32 [B, 257, 1280] (penultimate block).

    Build with ``ClipImageEncoder.load(path)`` (Wan's open-clip ``.pth`` or an HF folder).

    Args:
        model: a full ``transformers.CLIPVisionModel``; its last encoder block is removed here (the module
            takes ownership), so ``last_hidden_state`` becomes the full tower's ``hidden_states[-2]``.
        autocast_dtype: Wan runs the tower under fp16 autocast on CUDA (fp32 weights, fp32 LayerNorms);
            None runs in the weights' dtype. Autocast is never used on CPU (as in Wan).

    Attributes:
        dim: token width (1280). image_size: input side after resizing (224). num_tokens: 1 + patches (257).
    """

    def __init__(self, model: nn.Module, *, autocast_dtype: torch.dtype | None = torch.float16):
        super().__init__()
        # transformers < 5 nests the tower under .vision_model; 5 flattened it into CLIPVisionModel itself.
        tower = getattr(model, "vision_model", model)
        blocks = tower.encoder.layers
        if len(blocks) < 2:
            raise ValueError(f"the CLIP tower needs >= 2 blocks to take the penultimate one, has {len(blocks)}")
        tower.encoder.layers = blocks[:-1]
        model.config.num_hidden_layers = len(blocks) - 1
        self.model = model.eval().requires_grad_(False)
        self.autocast_dtype = autocast_dtype
        self.dim = int(model.config.hidden_size)
        self.image_size = int(model.config.image_size)
        self.num_tokens = 1 + (self.image_size // int(model.config.patch_size)) ** 2

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = torch.float16,
        num_heads: int = 16,
    ) -> ClipImageEncoder:
        """Load Wan's open-clip ``.pth`` (visual part only; or a Wan-layout ``.safetensors``) or an HF folder.

        Wan keeps this file's fp32 weights and runs under fp16 autocast: the defaults do the same.
        ``num_heads`` (not visible in the weights' shapes) applies to Wan-layout files; ViT-H/14 has 16.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"CLIP weights not found: {path} (expected Wan's open-clip .pth or an HF folder)")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} is a folder but has no config.json (expected an HF CLIP model)")
            # local: transformers model classes load on first use (~20 ms); only the Wan I2V encoder needs them
            from transformers import CLIPVisionModel

            model = CLIPVisionModel.from_pretrained(str(path), **hf_dtype_kwarg(dtype))
            return cls(model, autocast_dtype=autocast_dtype).to(device)
        sd = read_state_dict(path, keep=lambda k: k.startswith("visual."))
        if not sd:
            raise EncoderCheckpointError(f"{path}: no 'visual.*' keys (expected Wan's open-clip CLIP checkpoint)")
        config = clip_vision_config_from_wan(sd, num_heads=num_heads, source=str(path))
        return cls.from_wan_state_dict(
            sd, config, dtype=dtype, device=device, autocast_dtype=autocast_dtype, source=str(path)
        )

    @classmethod
    def from_wan_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        config=None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = torch.float16,
        source: str = "Wan CLIP state dict",
    ) -> ClipImageEncoder:
        """Build from Wan's open-clip state dict (non-``visual.`` keys ignored). ``config`` (of the full tower)
        defaults to the one read off the shapes with 16 heads (ViT-H/14). Built on the meta device: no random
        init, no extra copy."""
        # local: transformers model classes load on first use (~20 ms); only the Wan I2V encoder needs them
        from transformers import CLIPVisionModel

        visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
        visual.pop("visual.head", None)  # projection to the joint space: not used by Wan, not in the model
        config = clip_vision_config_from_wan(visual, source=source) if config is None else config
        with torch.device("meta"):
            model = CLIPVisionModel(config)
        own = model.state_dict()
        check_keys(visual, hf_clip_to_wan(own), source, f"CLIP vision tower ({config.num_hidden_layers} blocks)")
        hf = wan_clip_to_hf(visual, source=source)
        if not any(k.startswith("vision_model.") for k in own):  # transformers >= 5 has no prefix in-module
            hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
        model.load_state_dict(hf, strict=True, assign=True)
        _fill_meta_buffers(model)
        return cls(model, autocast_dtype=autocast_dtype).to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> ClipImageEncoder:
        """Frozen: stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    @property
    def _patch_weight(self) -> Tensor:
        return getattr(self.model, "vision_model", self.model).embeddings.patch_embedding.weight

    @property
    def device(self) -> torch.device:
        return self._patch_weight.device

    @torch.no_grad()  # not inference_mode: the outputs feed training graphs
    def encode(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] (or [B, 3, 1, H, W], a first frame in video layout) in [-1, 1]
        -> float32 [B, num_tokens, dim] (CLS first)."""
        if images.ndim == 5 and images.shape[2] == 1:
            images = images[:, :, 0]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] or [B, 3, 1, H, W], got {tuple(images.shape)}")
        lo, hi = images.aminmax()
        if lo < -1.5 or hi > 1.5:  # catches [0, 255] pixels; [0, 1] input cannot be told apart from [-1, 1]
            raise ValueError(f"images must be in [-1, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
        pixels = preprocess_images(images.to(self.device), self.image_size)
        weight_dtype = self._patch_weight.dtype
        use_autocast = self.autocast_dtype is not None and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype, enabled=use_autocast):
            out = self.model(pixel_values=pixels.to(weight_dtype)).last_hidden_state
        return out.float()

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)
