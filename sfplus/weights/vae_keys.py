"""Key maps between the original Wan2.1 VAE (`Wan2.1_VAE.pth`, = WanVAE) and diffusers `AutoencoderKLWan`.

See docs/wan_architecture.md, 'diffusers VAE keys'. Tensors are only renamed, never reshaped. The decoder's flat
`upsamples.N` list becomes `up_blocks.b.{resnets.j, upsamplers.0}` in diffusers; the grouping is read off the keys
themselves (a Resample ends a block), so the maps work for any WanVAE configuration diffusers can express (no decoder
attention blocks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

# Inside a ResidualBlock: Wan name -> diffusers name (first path component(s)).
_RESBLOCK_TO_DIFFUSERS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2": "conv1",
    "residual.3.gamma": "norm2.gamma",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}
_RESBLOCK_TO_WAN = {v: k for k, v in _RESBLOCK_TO_DIFFUSERS.items()}
# Names inside Resample / AttentionBlock, identical on both sides.
_SHARED_INNER = ("resample.", "time_conv.", "norm.gamma", "to_qkv.", "proj.")


class VAEKeyError(ValueError):
    """A state-dict key that does not belong to the Wan2.1 VAE layout."""


def _rename_inner(rest: str, table: Mapping[str, str], key: str) -> str:
    """Rename the part of a key below a block (e.g. 'residual.2.weight' -> 'conv1.weight')."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    if rest.startswith(_SHARED_INNER):
        return rest
    raise VAEKeyError(f"unknown VAE key {key!r}")


def _rename_top(key: str, table: Mapping[str, str]) -> str | None:
    """Keys outside the block lists, one table entry per prefix; None if `key` is in a block list."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


_WAN_TOP = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.2.": "decoder.conv_out.",
}
_DIFFUSERS_TOP = {v: k for k, v in _WAN_TOP.items()}
_WAN_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_DIFFUSERS_MIDDLE = {v: k for k, v in _WAN_MIDDLE.items()}


def wan_vae_to_diffusers(state: Mapping[str, V]) -> dict[str, V]:
    """Original Wan2.1 VAE keys (WanVAE) -> diffusers `AutoencoderKLWan` keys. Values are passed through."""
    # Decoder grouping: walk upsamples.N in order; a Resample closes the current up_block.
    kinds: dict[int, str] = {}
    for key in state:
        m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
        if m:
            n, rest = int(m.group(1)), m.group(2)
            if rest.startswith(("resample.", "time_conv.")):
                kinds[n] = "resample"
            elif rest.startswith(("to_qkv.", "proj.", "norm.gamma")):
                raise VAEKeyError(f"{key!r}: diffusers AutoencoderKLWan has no attention blocks in the decoder")
            else:
                kinds.setdefault(n, "resblock")
    where: dict[int, str] = {}
    block, j = 0, 0
    for n in sorted(kinds):
        if kinds[n] == "resample":
            where[n] = f"up_blocks.{block}.upsamplers.0"
            block, j = block + 1, 0
        else:
            where[n] = f"up_blocks.{block}.resnets.{j}"
            j += 1

    out: dict[str, V] = {}
    for key, value in state.items():
        new = _rename_top(key, _WAN_TOP)
        if new is None:
            m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d+)\.(.+)", key)
            d = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
            u = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
            if m and m.group(2) in _WAN_MIDDLE:
                new = f"{m.group(1)}.mid_block.{_WAN_MIDDLE[m.group(2)]}." + _rename_inner(
                    m.group(3), _RESBLOCK_TO_DIFFUSERS, key
                )
            elif d:
                new = f"encoder.down_blocks.{d.group(1)}." + _rename_inner(d.group(2), _RESBLOCK_TO_DIFFUSERS, key)
            elif u:
                new = f"decoder.{where[int(u.group(1))]}." + _rename_inner(u.group(2), _RESBLOCK_TO_DIFFUSERS, key)
            else:
                raise VAEKeyError(f"unknown Wan VAE key {key!r}")
        out[new] = value
    return out


def diffusers_vae_to_wan(state: Mapping[str, V]) -> dict[str, V]:
    """diffusers `AutoencoderKLWan` keys -> original Wan2.1 VAE keys (WanVAE). Values are passed through."""
    # Decoder: flat index of up_blocks.b.resnets.j = (layers in blocks < b) + j; the upsampler comes last.
    resnets: dict[int, int] = {}
    upsampler: set[int] = set()
    for key in state:
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\..+", key)
        if m:
            b = int(m.group(1))
            resnets.setdefault(b, 0)
            if m.group(3) is not None:
                resnets[b] = max(resnets[b], int(m.group(3)) + 1)
            else:
                upsampler.add(b)
    offset: dict[int, int] = {}
    total = 0
    for b in range(max(resnets, default=-1) + 1):
        if b not in resnets:
            raise VAEKeyError(f"diffusers VAE state dict has no decoder.up_blocks.{b} (blocks {sorted(resnets)})")
        offset[b] = total
        total += resnets[b] + (b in upsampler)

    out: dict[str, V] = {}
    for key, value in state.items():
        new = _rename_top(key, _DIFFUSERS_TOP)
        if new is None:
            m = re.fullmatch(r"(encoder|decoder)\.mid_block\.((?:resnets|attentions)\.\d+)\.(.+)", key)
            d = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
            r = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
            u = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key)
            if m and m.group(2) in _DIFFUSERS_MIDDLE:
                new = f"{m.group(1)}.middle.{_DIFFUSERS_MIDDLE[m.group(2)]}." + _rename_inner(
                    m.group(3), _RESBLOCK_TO_WAN, key
                )
            elif d:
                new = f"encoder.downsamples.{d.group(1)}." + _rename_inner(d.group(2), _RESBLOCK_TO_WAN, key)
            elif r:
                b, j = int(r.group(1)), int(r.group(2))
                new = f"decoder.upsamples.{offset[b] + j}." + _rename_inner(r.group(3), _RESBLOCK_TO_WAN, key)
            elif u:
                b = int(u.group(1))
                new = f"decoder.upsamples.{offset[b] + resnets[b]}." + _rename_inner(u.group(2), {}, key)
            else:
                raise VAEKeyError(f"unknown diffusers VAE key {key!r}")
        out[new] = value
    return out


def is_diffusers_vae_state_dict(state: Mapping[str, object]) -> bool:
    """True if the keys are diffusers `AutoencoderKLWan` names (quant_conv / conv_in), False for Wan names."""
    return any(k.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_in.")) for k in state)
