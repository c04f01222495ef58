"""The frozen side of every recipe: text (and image) encoders and the video codec.

A ``Conditioner`` turns prompts into the keyword arguments of the DiT (``cond`` dicts) and latents into pixels.
Its encoders never train; the negative-prompt embedding (the unconditional branch of CFG) is computed once per
batch size and device and cached.

cond dict keys (all optional but ``context``): ``context`` [B, L, D_text]; ``clip_fea`` [B, 257, D_img]
and ``y`` [B, 4 + C, F, H, W] for image-to-video.
"""

from __future__ import annotations

import torch
from torch import nn

from sfplus.nets.codec import toy_codec
from sfplus.nets.text import ToyTextEncoder

Cond = dict[str, torch.Tensor]


class Conditioner(nn.Module):
    """Frozen encoders behind one interface.

    Args:
        text_encoder: module with ``encode(list[str]) -> [B, L, D]`` (rows past a prompt's length zeroed).
        codec: the video codec (``encode``/``decode`` between pixels [B, 3, T, H, W] in [-1, 1] and latents).
        negative_prompt: text of the unconditional branch (Wan's negative prompt for the real models).
        image_encoder: optional image encoder for I2V (``encode(images [B, 3, H, W]) -> [B, N, D]``).
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        codec: nn.Module,
        negative_prompt: str = "",
        image_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.codec = codec.requires_grad_(False).eval() if isinstance(codec, nn.Module) else codec
        self.image_encoder = image_encoder.requires_grad_(False).eval() if image_encoder is not None else None
        self.negative_prompt = negative_prompt
        self._negative_cache: dict[tuple, torch.Tensor] = {}

    def train(self, mode: bool = True) -> Conditioner:
        # Frozen encoders stay in eval mode whatever the LightningModule does.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def text(self, prompts: list[str], device: torch.device | None = None) -> Cond:
        """``{"context": [B, L, D]}`` for a list of prompts."""
        if not prompts:
            raise ValueError("no prompts to encode")
        ctx = self.text_encoder.encode(list(prompts))
        return {"context": ctx.to(device) if device is not None else ctx}

    @torch.no_grad()
    def negative(self, batch: int, device: torch.device | None = None) -> Cond:
        """The unconditional cond dict for ``batch`` samples (negative prompt), cached."""
        key = (device, batch)
        if key not in self._negative_cache:
            ctx = self.text_encoder.encode([self.negative_prompt])
            if device is not None:
                ctx = ctx.to(device)
            self._negative_cache[key] = ctx.expand(batch, *ctx.shape[1:]).contiguous()
        return {"context": self._negative_cache[key]}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F, h, w] → pixels [B, 3, T, H, W] in [-1, 1]."""
        return self.codec.decode(latents)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, T, H, W] in [-1, 1] → latents [B, C, F, h, w]."""
        return self.codec.encode(video)

    def video_codec(self) -> nn.Module:
        """The codec :meth:`decode` uses (streaming decoding block by block goes through its ``stream_decoder``)."""
        return self.codec


class ToyConditioner(Conditioner):
    """The built-in toy task's frozen side: a hashed-word text encoder and a lossless codec.

    Args:
        text_dim: width of the toy text embedding (the toy DiT preset's ``text_dim``).
        text_len: tokens per prompt (the toy preset's ``text_len``).
        negative_prompt: unconditional text; the toy teacher is trained with it as the dropped-prompt token.
        frames_per_latent: 1 = the identity codec (latents are the pixels, one latent frame per frame); s > 1 =
            ``TimePackCodec(s)`` (s frames stacked along the channels: 3·s latent channels). The demo uses 4.
    """

    def __init__(self, text_dim: int = 32, text_len: int = 16, negative_prompt: str = "",
                 frames_per_latent: int = 1) -> None:
        super().__init__(ToyTextEncoder(dim=text_dim, max_len=text_len), toy_codec(frames_per_latent), negative_prompt)
