"""Wan LoRA files: what ``sfplus export`` writes from a LoRA distillation and what ``lora.generator_init`` reads.

Layouts (facts from diffusers' Wan LoRA loader, ``_convert_non_diffusers_wan_lora_to_diffusers``, and the files
lightx2v publishes):

* ``wan`` (written by default; read by diffusers' ``WanPipeline.load_lora_weights`` and ComfyUI):
  ``diffusion_model.blocks.{i}.self_attn.q.lora_A.weight`` [rank, in] and ``...lora_B.weight`` [out, rank];
* ``diffusers``: ``transformer.blocks.{i}.attn1.to_q.lora_A.weight`` (the diffusers module names,
  :mod:`sfplus.weights.diffusers_keys`).

Written files carry no ``.alpha``: the adapter's scale ``alpha / rank`` is folded into ``lora_B``, so every loader
applies ``B A`` at scale 1. Read files may use ``lora_down`` / ``lora_up`` and per-linear ``.alpha`` scalars (scale
``alpha / rank``, folded into ``B`` on reading).

In memory a LoRA is ``{"blocks.{i}.{target}": (A [rank, in], B [out, rank])}`` with the scale folded into ``B``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from sfplus.file_checks import load_safetensors
from sfplus.weights.checkpoints import CheckpointError
from sfplus.weights.diffusers_keys import KeyMapError, diffusers_key_to_wan, wan_key_to_diffusers

__all__ = ["LoRAFileError", "adapter_to_lora", "lora_to_adapter", "merge_lora", "read_lora_file", "write_lora_file"]

PREFIXES = {"wan": "diffusion_model.", "diffusers": "transformer."}
_KEY = re.compile(r"(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight|(?P<apath>.+)\.alpha")

_WAN_LINEAR = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])")


class LoRAFileError(CheckpointError):
    """A LoRA file that does not fit the base (keys or shapes), or that cannot be read."""


def _shorten(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")


def adapter_to_lora(adapter_sd: dict[str, torch.Tensor], scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A :class:`sfplus.modules.lora.LoRANet` state dict (``{path}.lora_A.weight`` ...) → ``{path: (A, scale · B)}``."""
    out = {}
    for key, a in adapter_sd.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b = adapter_sd[f"{path}.lora_B.weight"]
            out[path] = (a.detach().float().cpu(), b.detach().float().cpu() * scale)
    return out


def lora_to_adapter(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter_sd: dict[str, torch.Tensor],
                    scale: float, source: str) -> dict[str, torch.Tensor]:
    """A read LoRA → a state dict for an adapter shaped like ``adapter_sd`` (scale ``scale``): ``B`` divided by the
    scale; linears the adapter has but the file lacks get ``B = 0`` (no change). Errors name the keys at fault."""
    paths = {k[: -len(".lora_A.weight")] for k in adapter_sd if k.endswith(".lora_A.weight")}
    unknown = sorted(set(lora) - paths)
    if unknown:
        raise LoRAFileError(f"LoRA {source} adapts linears this adapter does not: {_shorten(unknown)}")
    bad = []
    for path, (a, b) in lora.items():
        want_a, want_b = adapter_sd[f"{path}.lora_A.weight"].shape, adapter_sd[f"{path}.lora_B.weight"].shape
        if tuple(a.shape) != tuple(want_a) or tuple(b.shape) != tuple(want_b):
            bad.append(f"{path}: A {tuple(a.shape)} B {tuple(b.shape)} vs {tuple(want_a)} {tuple(want_b)}")
    if bad:
        raise LoRAFileError(f"LoRA {source} does not fit this base/rank (shapes): {_shorten(bad)}")
    out = {}
    for key, ref in adapter_sd.items():
        path, kind = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if path in lora:
            a, b = lora[path]
            out[key] = (a if kind == "lora_A" else b / scale).to(ref.dtype)
        else:
            out[key] = torch.zeros(tuple(ref.shape), dtype=ref.dtype) if kind == "lora_B" else ref.detach().cpu()
    return out


def write_lora_file(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], out: str | os.PathLike,
                    layout: str = "wan", dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``lora`` as one safetensors file in ``layout`` (``wan`` or ``diffusers``)."""
    if layout not in PREFIXES:
        raise LoRAFileError(f"LoRA layout must be one of {sorted(PREFIXES)}, got {layout!r}")
    sd = {}
    for path, (a, b) in lora.items():
        name = path if layout == "wan" else wan_key_to_diffusers(f"{path}.weight")[: -len(".weight")]
        sd[f"{PREFIXES[layout]}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        sd[f"{PREFIXES[layout]}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt", "sfplus_lora_layout": layout})
    return out


def read_lora_file(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read a Wan LoRA file (either layout; ``lora_A/B`` or ``lora_down/up``; optional ``.alpha``) as
    ``{"blocks.{i}.{target}": (A, B)}`` in Wan names, the scale folded into ``B`` (float32)."""
    p = Path(path)
    raw = load_safetensors(p, "LoRA file", LoRAFileError)  # missing, empty or damaged: one line naming it
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in raw.items():
        stem = key
        for prefix in PREFIXES.values():
            if stem.startswith(prefix):
                stem = stem[len(prefix):]
                break
        m = _KEY.fullmatch(stem)
        if m is None:
            unknown.append(key)
            continue
        if m.group("apath"):
            alphas[m.group("apath")] = float(value)
            continue
        kind = "A" if m.group("kind") in ("lora_A", "lora_down") else "B"
        pairs.setdefault(m.group("path"), {})[kind] = value.float()
    if unknown:
        raise LoRAFileError(f"LoRA file {p} has keys that are not LoRA weights of a Wan DiT: {_shorten(unknown)}")
    out = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAFileError(f"LoRA file {p}: {path} has only lora_{'A' if 'A' in ab else 'B'}")
        try:  # diffusers module names → Wan names (Wan names pass through unchanged)
            wan = path if _WAN_LINEAR.fullmatch(path) else diffusers_key_to_wan(f"{path}.weight")[: -len(".weight")]
        except KeyMapError:
            raise LoRAFileError(f"LoRA file {p}: {path} is not a Wan block linear") from None
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAFileError(f"LoRA file {p}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, not "
                                "[rank, in] and [out, rank]")
        scale = alphas.get(path, a.shape[0]) / a.shape[0]
        out[wan] = (a, b * scale)
    if not out:
        raise LoRAFileError(f"LoRA file {p} holds no LoRA weights")
    return out


def merge_lora(base_sd: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
               source: str = "LoRA") -> dict[str, torch.Tensor]:
    """Full Wan weights: ``W + B A`` (computed in float32, stored in ``W``'s dtype) for every adapted linear."""
    missing = sorted(f"{path}.weight" for path in lora if f"{path}.weight" not in base_sd)
    if missing:
        raise LoRAFileError(f"{source} adapts weights the base does not have: {_shorten(missing)}")
    out = dict(base_sd)
    bad = []
    for path, (a, b) in lora.items():
        w = base_sd[f"{path}.weight"]
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            bad.append(f"{path}: base {tuple(w.shape)} vs LoRA {(b.shape[0], a.shape[1])}")
            continue
        out[f"{path}.weight"] = (w.float() + b.float() @ a.float()).to(w.dtype)
    if bad:
        raise LoRAFileError(f"{source} does not fit the base (shapes): {_shorten(bad)}")
    return out
