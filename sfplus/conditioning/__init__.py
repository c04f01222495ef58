"""The frozen side of every recipe: prompts to text embeddings, images to I2V conditioning, latents to pixels.

* :mod:`~sfplus.conditioning.conditioner` — the :class:`Conditioner` interface and the toy task's conditioner;
* :mod:`~sfplus.conditioning.wan` — Wan2.1's UMT5, VAE and CLIP from a Wan-AI model folder;
* :mod:`~sfplus.conditioning.i2v` — reading, checking and resizing first frames, and the I2V mask and latents.

Configs name the classes through this package: ``class_path: sfplus.conditioning.WanConditioner``.
"""

from sfplus.conditioning.conditioner import Cond, Conditioner, ToyConditioner
from sfplus.conditioning.i2v import ImageReadError, i2v_condition, load_image, wan_i2v_size
from sfplus.conditioning.wan import WAN_NEGATIVE_PROMPT, WanConditioner, WanFiles, resolve_wan_files

__all__ = [
    "WAN_NEGATIVE_PROMPT",
    "Cond",
    "Conditioner",
    "ImageReadError",
    "ToyConditioner",
    "WanConditioner",
    "WanFiles",
    "i2v_condition",
    "load_image",
    "resolve_wan_files",
    "wan_i2v_size",
]
