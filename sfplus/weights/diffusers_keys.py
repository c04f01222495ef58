"""Wan-original <-> diffusers `WanTransformer3DModel` state-dict key map (docs/wan_architecture.md, 'diffusers DiT
keys').

Pure renames (no tensor changes). Whole-name rules are matched with anchored regexes, so the traps of substring
converters (the norm2/norm3 swap, `cross_attn.k` inside `cross_attn.k_img`) cannot occur.
"""

from __future__ import annotations

import re

__all__ = ["diffusers_to_wan", "wan_to_diffusers", "wan_key_to_diffusers", "diffusers_key_to_wan"]

# (Wan-original, diffusers) name pairs; a trailing "." means "this prefix, then .weight/.bias".
_TOP = [
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
]
_BLOCK = [  # inside blocks.{i}.
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("norm3.", "norm2."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
]
_SUFFIX = r"(weight|bias)"
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
# diffusers keys that carry no weights in Wan (ignored by diffusers itself on load)
_DIFFUSERS_IGNORED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")


class KeyMapError(ValueError):
    """A state-dict key that the Wan <-> diffusers map does not know."""


def _rename(name: str, pairs: list[tuple[str, str]], src: int) -> str | None:
    for pair in pairs:
        prefix, target = pair[src], pair[1 - src]
        if prefix.endswith("."):
            m = re.fullmatch(re.escape(prefix) + _SUFFIX, name)
            if m:
                return target + m.group(1)
        elif name == prefix:
            return target
    return None


def _convert_key(key: str, src: int) -> str:
    m = _BLOCK_RE.fullmatch(key)
    new = None
    if m:
        inner = _rename(m.group(2), _BLOCK, src)
        new = None if inner is None else f"blocks.{m.group(1)}.{inner}"
    else:
        new = _rename(key, _TOP, src)
    if new is None:
        kind = "Wan-original" if src == 0 else "diffusers"
        raise KeyMapError(f"unknown {kind} WanDiT key {key!r}")
    return new


def wan_key_to_diffusers(key: str) -> str:
    return _convert_key(key, 0)


def diffusers_key_to_wan(key: str) -> str:
    return _convert_key(key, 1)


def wan_to_diffusers(state_dict: dict) -> dict:
    """Wan-original state dict -> diffusers `WanTransformer3DModel` names (same tensors)."""
    return {wan_key_to_diffusers(k): v for k, v in state_dict.items()}


def diffusers_to_wan(state_dict: dict) -> dict:
    """diffusers `WanTransformer3DModel` state dict -> Wan-original names (same tensors).

    Drops `attn2.norm_added_q.weight` dummies (written by some converters, unused by the model).
    """
    return {diffusers_key_to_wan(k): v for k, v in state_dict.items() if not _DIFFUSERS_IGNORED.fullmatch(k)}
