"""Named WanDiT architectures (docs/wan_architecture.md, 'Configurations') and `build_dit`."""

from __future__ import annotations

import dataclasses

from sfplus.nets.wan import WanConfig, WanDiT

__all__ = ["PRESETS", "build_dit", "get_config"]

PRESETS: dict[str, WanConfig] = {
    # The released Wan2.1 models (head_dim 128).
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-i2v-14b-480p": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, image_dim=1280),
    # Same classes at test size (head_dim 16: RoPE split 8/4/4).
    "tiny": WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=8),
    "tiny-i2v": WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=36, text_dim=16, text_len=8,
                          image_dim=16),
    # The built-in toy teacher: 3-channel pixel "latents" through the identity codec. Two heads of 32 channels:
    # RoPE then has 6 temporal and 5+5 spatial frequencies per head (4 heads of 16 learn motion more slowly).
    "toy": WanConfig(dim=64, ffn_dim=256, num_heads=2, num_layers=4, in_dim=3, out_dim=3, text_dim=32, text_len=16),
}


def get_config(name_or_config: str | WanConfig, **overrides) -> WanConfig:
    """A preset by name (or a given config), with field overrides applied (validated by WanConfig)."""
    if isinstance(name_or_config, WanConfig):
        config = name_or_config
    elif name_or_config in PRESETS:
        config = PRESETS[name_or_config]
    else:
        raise ValueError(f"unknown WanDiT preset {name_or_config!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown WanConfig field(s) {unknown}; known: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides)


def build_dit(name_or_config: str | WanConfig, **overrides) -> WanDiT:
    """Construct a WanDiT on the current default device (e.g. inside `with torch.device("meta"):`)."""
    return WanDiT(get_config(name_or_config, **overrides))
