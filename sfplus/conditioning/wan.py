"""The frozen side of the real Wan2.1 models: UMT5 text encoder, Wan VAE and (I2V) CLIP image encoder.

``WanConditioner`` is a :class:`sfplus.conditioning.conditioner.Conditioner` built from a Wan model folder as published
(docs/wan_architecture.md, 'Wan-AI repos') or from explicit paths:

    Wan2.1-T2V-14B/                                   Wan2.1-I2V-14B-480P/
      models_t5_umt5-xxl-enc-bf16.pth   (t5)            ... the same three, plus
      google/umt5-xxl/                  (tokenizer)     models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (clip)
      Wan2.1_VAE.pth                    (vae)

A diffusers repo (``text_encoder/``, ``tokenizer/``, ``vae/``, ``image_encoder/``) works too. Paths are checked
when the conditioner is built (a missing file is named before any GPU work starts); the encoders themselves load
on first use, straight onto the device the LightningModule was moved to, so no full CPU copy is made first.

``image_condition(images)`` gives the I2V entries ``clip_fea`` and ``y`` for a batch of first frames
(:func:`sfplus.conditioning.i2v.i2v_condition`); the recipes add them to both cond and uncond
(docs/algorithms.md, 'I2V conditioning in the recipes').
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sfplus.conditioning.conditioner import Cond, Conditioner
from sfplus.conditioning.i2v import i2v_condition
from sfplus.nets.codec import WanVAECodec
from sfplus.nets.image import ClipImageEncoder
from sfplus.nets.text import UMT5TextEncoder
from sfplus.nets.vae import load_wan_vae

__all__ = [
    "CLIP_FILE",
    "T5_FILE",
    "TOKENIZER_DIR",
    "VAE_FILE",
    "WAN_I2V_NEGATIVE_PROMPT",
    "WAN_NEGATIVE_PROMPT",
    "WanConditioner",
    "WanFiles",
    "resolve_wan_files",
]

# Wan2.1's default negative prompt (shared_config.sample_neg_prompt): the unconditional text of every reference
# recipe (docs/algorithms.md, 'CFG conventions').
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Official Wan I2V prepends "camera shake" to it.
WAN_I2V_NEGATIVE_PROMPT = "镜头晃动，" + WAN_NEGATIVE_PROMPT

# File names in a Wan-AI model folder, then the diffusers equivalents (tried in this order).
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
_CANDIDATES = {
    "t5": (T5_FILE, "text_encoder"),
    "tokenizer": (TOKENIZER_DIR, "tokenizer"),
    "vae": (VAE_FILE, "vae"),
    "clip": (CLIP_FILE, "image_encoder"),
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class WanFiles:
    """Resolved paths of the frozen encoders (``clip`` is None for text-to-video)."""

    t5: Path
    tokenizer: Path
    vae: Path
    clip: Path | None


def _pick(name: str, explicit: str | os.PathLike | None, model_dir: Path | None) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"WanConditioner: {name} {path} does not exist")
        return path
    if model_dir is None:
        raise FileNotFoundError(f"WanConditioner: no {name} path given and no model_dir to find it in")
    tried = [model_dir / c for c in _CANDIDATES[name]]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"WanConditioner: {name} not found in {model_dir} (looked for {', '.join(p.name for p in tried)}; "
        f"pass {name}=<path> to point at it)"
    )


def resolve_wan_files(
    model_dir: str | os.PathLike | None = None,
    *,
    t5: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    i2v: bool = False,
) -> WanFiles:
    """Paths of T5, tokenizer, VAE (and CLIP if ``i2v``): explicit paths win, the rest come from ``model_dir``.

    Raises FileNotFoundError naming the first missing file (and what was looked for).
    """
    root = None
    if model_dir is not None:
        root = Path(model_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"WanConditioner: model_dir {root} is not a folder")
    return WanFiles(
        t5=_pick("t5", t5, root),
        tokenizer=_pick("tokenizer", tokenizer, root),
        vae=_pick("vae", vae, root),
        clip=_pick("clip", clip, root) if i2v else None,
    )


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"WanConditioner: {what} must be one of {list(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class WanConditioner(Conditioner):
    """Wan2.1's T5 / VAE / CLIP behind the Conditioner interface (prompts → ``context``; images → ``clip_fea``, ``y``).

    Args:
        model_dir: a Wan-AI (or diffusers) model folder holding the files below.
        t5: Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` or an HF UMT5 folder (overrides model_dir's).
        tokenizer: the ``google/umt5-xxl`` tokenizer folder.
        vae: ``Wan2.1_VAE.pth``, a ``.safetensors`` file or a diffusers ``vae/`` folder.
        clip: the open-clip ``.pth`` (or an HF CLIP vision folder); I2V only.
        i2v: image-to-video: also load CLIP and provide :meth:`image_condition`.
        negative_prompt: unconditional text; None: Wan's default for the task (``WAN_NEGATIVE_PROMPT``, with
            "镜头晃动，" prepended for I2V as official Wan does).
        text_dtype: T5 weights/compute dtype (``bf16`` as Wan; ``fp32`` as Self-Forcing).
        vae_dtype: VAE dtype; None: bf16 on CUDA, fp32 on CPU.
        offload_text_encoder: keep T5 (11 GB) in CPU memory and run it there; only the embeddings move to the
            device. Costs CPU time per new prompt batch (the negative prompt is cached); the reference's I2V
            config offloads it.
        num_pixel_frames: video length T for the I2V conditioning video (1 + 4k; 81 for Wan2.1 = 21 latent frames).
        vae_config: WanVAE constructor overrides (another VAE size; used by tests).
        clip_num_heads: CLIP attention heads (not visible in the weights; 16 for Wan's ViT-H/14).

    The encoders are loaded on first use onto the conditioner's device (it follows ``.to()`` through a buffer);
    they are frozen and never appear in checkpoints (the recipes drop ``conditioner.*`` keys).
    """

    def __init__(
        self,
        model_dir: str | None = None,
        t5: str | None = None,
        tokenizer: str | None = None,
        vae: str | None = None,
        clip: str | None = None,
        i2v: bool = False,
        negative_prompt: str | None = None,
        text_dtype: str = "bf16",
        vae_dtype: str | None = None,
        offload_text_encoder: bool = False,
        num_pixel_frames: int = 81,
        vae_config: dict | None = None,
        clip_num_heads: int = 16,
    ) -> None:
        nn.Module.__init__(self)  # not Conditioner.__init__: the encoders load lazily (see _text_encoder & co.)
        self.files = resolve_wan_files(model_dir, t5=t5, tokenizer=tokenizer, vae=vae, clip=clip, i2v=i2v)
        if num_pixel_frames < 1 or (num_pixel_frames - 1) % 4:
            raise ValueError(f"WanConditioner: num_pixel_frames must be 1 + 4k (81 for Wan2.1), got {num_pixel_frames}")
        self.i2v = i2v
        self.negative_prompt = negative_prompt if negative_prompt is not None else (
            WAN_I2V_NEGATIVE_PROMPT if i2v else WAN_NEGATIVE_PROMPT)
        self.text_dtype = _dtype(text_dtype, "text_dtype")
        self.vae_dtype = _dtype(vae_dtype, "vae_dtype")
        self.offload_text_encoder = offload_text_encoder
        self.num_pixel_frames = num_pixel_frames
        self.vae_config = dict(vae_config or {})
        self.clip_num_heads = clip_num_heads
        self._negative_cache: dict[tuple, torch.Tensor] = {}
        # Tracks the device Lightning moves the module to, so lazily loaded encoders go straight there.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.text_encoder: nn.Module | None = None
        self.codec: nn.Module | None = None
        self.image_encoder: nn.Module | None = None
        self._offloaded_text_encoder: nn.Module | None = None  # kept out of the module tree: .to() must not move it

    @classmethod
    def from_modules(
        cls, text_encoder: nn.Module, codec: nn.Module, image_encoder: nn.Module | None = None, *,
        negative_prompt: str | None = None, num_pixel_frames: int = 81,
    ) -> WanConditioner:
        """A WanConditioner around already built encoders (no files; tests and notebooks)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.files = None
        self.i2v = image_encoder is not None
        self.negative_prompt = negative_prompt if negative_prompt is not None else (
            WAN_I2V_NEGATIVE_PROMPT if self.i2v else WAN_NEGATIVE_PROMPT)
        self.text_dtype = self.vae_dtype = None
        self.offload_text_encoder = False
        self.num_pixel_frames = num_pixel_frames
        self.vae_config, self.clip_num_heads = {}, 16
        self._negative_cache = {}
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self._offloaded_text_encoder = None
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.codec = codec.requires_grad_(False).eval()
        self.image_encoder = image_encoder.requires_grad_(False).eval() if image_encoder is not None else None
        return self

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    # ---- lazy loading ---------------------------------------------------------------------------------------------
    def _text_encoder(self) -> nn.Module:
        if self.text_encoder is not None:
            return self.text_encoder
        if self._offloaded_text_encoder is not None:
            return self._offloaded_text_encoder

        device = torch.device("cpu") if self.offload_text_encoder else self.device
        enc = UMT5TextEncoder.load(self.files.t5, self.files.tokenizer, dtype=self.text_dtype, device=device)
        enc = enc.requires_grad_(False).eval()
        if self.offload_text_encoder:
            object.__setattr__(self, "_offloaded_text_encoder", enc)  # not a submodule: .to() leaves it on the CPU
        else:
            self.text_encoder = enc
        return enc

    def _codec(self) -> nn.Module:
        if self.codec is None:
            dtype = self.vae_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
            vae = load_wan_vae(self.files.vae, device=self.device, dtype=dtype, **self.vae_config)
            self.codec = WanVAECodec(vae).requires_grad_(False).eval()
        return self.codec

    def _image_encoder(self) -> nn.Module:
        if self.image_encoder is None:
            if not self.i2v:
                raise ValueError("WanConditioner(i2v=False) has no image encoder: set i2v: true (and clip, or a "
                                 "model_dir holding the CLIP file) for image-to-video")

            enc = ClipImageEncoder.load(self.files.clip, device=self.device, num_heads=self.clip_num_heads)
            self.image_encoder = enc.requires_grad_(False).eval()
        return self.image_encoder

    def load(self) -> WanConditioner:
        """Load every encoder now (e.g. to fail early or to time it); normally they load on first use."""
        self._text_encoder()
        self._codec()
        if self.i2v:
            self._image_encoder()
        return self

    # ---- the Conditioner interface --------------------------------------------------------------------------------
    @torch.no_grad()
    def text(self, prompts: list[str], device: torch.device | None = None) -> Cond:
        """``{"context": float32 [B, 512, 4096]}`` (rows past each prompt zeroed), on ``device`` if given."""
        if not prompts:
            raise ValueError("no prompts to encode")
        ctx = self._text_encoder().encode(list(prompts))
        return {"context": ctx.to(device if device is not None else self.device)}

    @torch.no_grad()
    def negative(self, batch: int, device: torch.device | None = None) -> Cond:
        """The negative-prompt cond dict for ``batch`` samples (encoded once per device and batch size)."""
        device = torch.device(device) if device is not None else self.device
        key = (device, batch)
        if key not in self._negative_cache:
            ctx = self._text_encoder().encode([self.negative_prompt]).to(device)
            self._negative_cache[key] = ctx.expand(batch, *ctx.shape[1:]).contiguous()
        return {"context": self._negative_cache[key]}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, F, h, w] → pixels [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1]."""
        return self._codec().decode(latents.to(self.device))

    def video_codec(self) -> nn.Module:
        """The Wan VAE codec (loaded now if it was not yet)."""
        return self._codec()

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, 1 + 4k, H, W] in [-1, 1] → normalised latents [B, 16, 1 + k, H/8, W/8]."""
        return self._codec().encode(video.to(self.device))

    @torch.no_grad()
    def image_condition(self, images: torch.Tensor) -> Cond:
        """I2V entries for first frames ``images`` [B, 3, H, W] in [-1, 1] (already at the generation size).

        Returns ``{"clip_fea": float32 [B, 257, 1280], "y": [B, 4 + 16, F, H/8, W/8]}`` on the conditioner's
        device, F = 1 + (num_pixel_frames - 1) / 4; both go to the generator, the teacher and the critic, in the
        conditional and the unconditional branch alike.
        """

        encoder = self._image_encoder()
        images = images.to(self.device, torch.float32)
        return i2v_condition(images, self._codec(), encoder, self.num_pixel_frames)

    def extra_repr(self) -> str:
        if self.files is None:
            return f"i2v={self.i2v}, from modules"
        return f"i2v={self.i2v}, t5={self.files.t5}, vae={self.files.vae}, clip={self.files.clip}"
