"""Wan2.1 image-to-video conditioning (docs/wan_architecture.md, 'I2V conditioning'), batched.

An I2V DiT gets two extra inputs per sample:
* ``clip_fea`` [257, 1280]: CLIP ViT-H/14 penultimate-layer tokens of the first frame;
* ``y`` [4 + C, F, h, w]: a mask saying which *pixel* frames are given (only frame 0), packed 4 pixel frames per latent
  frame, followed by the latents of the "conditioning video" — the image followed by all-zero (mid-grey) frames.

Pipeline: ``load_image`` → ``wan_i2v_size`` → ``resize_image`` → ``i2v_condition``. Unlike the reference (batch 1
only: B13 in docs/algorithms.md, 'Reference bugs') everything here takes a batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

from sfplus.conditioning.conditioner import Cond
from sfplus.nets.codec import VideoCodec, latent_shape

__all__ = ["ImageReadError", "check_image", "i2v_condition", "i2v_mask", "load_image", "resize_image", "wan_i2v_size"]


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded."""


def wan_i2v_size(h: int, w: int, max_area: int, spatial_stride: int = 8, patch: int = 2, *,
                 rounding: str = "wan") -> tuple[int, int]:
    """Pixel size (H, W) Wan generates for an h x w input image under a pixel budget ``max_area``.

    Keeps the aspect ratio ar = h / w: ``lat_h = sqrt(max_area · ar) // stride // patch · patch`` (and ``lat_w``
    with ``/ ar``), so the latent grid is a multiple of the DiT patch; returns ``(lat_h · stride, lat_w · stride)``.

    rounding: "wan" floors the float square root exactly as official Wan does — a float quirk then sends a 480x832
        image at max_area = 480·832 to (464, 832), since sqrt(399360 · 480/832) evaluates to 479.99999999999994;
        "nearest" first rounds the square root to the nearest integer (diffusers' Wan I2V example), giving
        (480, 832) there.
    """
    if h <= 0 or w <= 0 or max_area <= 0 or spatial_stride <= 0 or patch <= 0:
        raise ValueError(f"wan_i2v_size needs positive sizes, got h={h}, w={w}, max_area={max_area}, "
                         f"spatial_stride={spatial_stride}, patch={patch}")
    if rounding not in ("wan", "nearest"):
        raise ValueError(f"unknown rounding {rounding!r}; known: wan, nearest")
    ar = h / w
    side_h, side_w = math.sqrt(max_area * ar), math.sqrt(max_area / ar)
    if rounding == "nearest":
        side_h, side_w = round(side_h), round(side_w)
    lat_h = round(side_h // spatial_stride // patch * patch)
    lat_w = round(side_w // spatial_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"max_area={max_area} is too small for a {h}x{w} image (latent grid {lat_h}x{lat_w})")
    return lat_h * spatial_stride, lat_w * spatial_stride


def _read_rgb_pil(path: Path) -> np.ndarray:
    from PIL import Image  # local: Pillow is optional (imageio-ffmpeg reads images without it)

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _read_rgb_ffmpeg(path: Path) -> np.ndarray:
    frames = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(frames)
        w, h = meta["size"]
        data = next(frames)
    finally:
        frames.close()
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)


def check_image(path: str | Path) -> None:
    """Raise ``ImageReadError`` (or ``FileNotFoundError``) naming ``path`` unless it is an image Pillow can open
    and verify. Reads the header and, for PNG, checks the chunks' CRCs; without Pillow only existence is checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"image {path} is empty (0 bytes)")
    try:
        from PIL import Image  # local: Pillow is optional (imageio-ffmpeg reads images without it)
    except ImportError:
        return
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError (PIL's parse errors): not one type
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ImageReadError(f"image {path} is damaged or not an image ({reason})") from None


def load_image(path: str | Path, backend: str | None = None) -> torch.Tensor:
    """Read an image file as float32 [3, H, W] in [-1, 1] (RGB; alpha dropped; ``x / 255 · 2 - 1`` as Wan).

    backend: "pil" (Pillow), "ffmpeg" (imageio-ffmpeg, a dependency of sfplus) or None: Pillow when installed.
    Raises FileNotFoundError for a missing path and ImageReadError for a file that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if backend is None:
        try:
            import PIL  # noqa: F401  # local: Pillow is optional (imageio-ffmpeg reads images without it)

            backend = "pil"
        except ImportError:
            backend = "ffmpeg"
    readers = {"pil": _read_rgb_pil, "ffmpeg": _read_rgb_ffmpeg}
    if backend not in readers:
        raise ValueError(f"unknown image backend {backend!r}; known: pil, ffmpeg")
    try:
        rgb = readers[backend](path)
    except (OSError, ValueError, RuntimeError, StopIteration) as err:  # PIL: OSError; ffmpeg: RuntimeError/empty
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]  # ffmpeg appends its whole stderr
        raise ImageReadError(f"cannot read image {path} ({backend}): {reason}") from err
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
    return x * 2.0 - 1.0


def resize_image(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of [3, H, W] or [B, 3, H, W] to (height, width), as Wan (no antialias, no clamp: the small
    bicubic overshoot is kept). Returns the input's dtype."""
    if img.ndim not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"expected an image [3, H, W] or [B, 3, H, W], got {tuple(img.shape)}")
    x = img[None] if img.ndim == 3 else img
    out = F.interpolate(x.float(), size=(height, width), mode="bicubic", align_corners=False).to(img.dtype)
    return out[0] if img.ndim == 3 else out


def i2v_mask(num_latent_frames: int, height: int, width: int, temporal_stride: int = 4, *,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Which pixel frames are given, in latent layout: [s, F, h, w] (s = temporal_stride channels).

    Wan's construction (docs/wan_architecture.md, 'I2V conditioning') for any F: a pixel mask over T = 1 + s(F - 1)
    frames with only frame 0 set; frame 0 repeated s times (→ s·F frames); viewed [F, s, h, w] and transposed. Channel k
    of latent frame j ≥ 1 stands for pixel frame s(j - 1) + 1 + k; latent frame 0 holds pixel frame 0 in all s channels.
    Result: latent frame 0 is 1 on every channel, everything else 0.
    """
    if num_latent_frames < 1 or height < 1 or width < 1 or temporal_stride < 1:
        raise ValueError(f"i2v_mask needs positive sizes, got F={num_latent_frames}, h={height}, w={width}, "
                         f"temporal_stride={temporal_stride}")
    s = temporal_stride
    pixel = torch.zeros(1 + s * (num_latent_frames - 1), height, width, dtype=dtype, device=device)
    pixel[0] = 1
    packed = torch.cat([pixel[:1].expand(s, height, width), pixel[1:]], dim=0)  # [s·F, h, w]
    return packed.view(num_latent_frames, s, height, width).transpose(0, 1).contiguous()


@torch.no_grad()
def i2v_condition(images: torch.Tensor, codec: VideoCodec, image_encoder, num_pixel_frames: int, *,
                  clip_images: torch.Tensor | None = None) -> Cond:
    """The I2V cond entries for a batch of first frames.

    Args:
        images: [B, 3, H, W] in [-1, 1], already at the generation size (`wan_i2v_size` + `resize_image`).
        codec: the video codec (Wan VAE), used to encode the conditioning video.
        image_encoder: the CLIP image encoder (``encode(images) -> [B, 257, D]``); None skips ``clip_fea``.
        num_pixel_frames: length T of the video to generate (1 + s·k; 81 for Wan2.1).
        clip_images: what CLIP sees, if not ``images`` (official Wan feeds CLIP the image before resizing).
    Returns: {"clip_fea": [B, 257, D] fp32, "y": [B, s + C, F, h, w]} — y = [mask (s channels), latents (C)], in the
    codec's output dtype.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"i2v_condition: expected images [B, 3, H, W], got {tuple(images.shape)}")
    lo, hi = images.aminmax()
    if lo < -1.5 or hi > 1.5:
        raise ValueError(f"i2v_condition: images must be in [-1, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
    b, _, height, width = images.shape
    _, frames, h, w = latent_shape(codec, num_pixel_frames, height, width)  # VideoShapeError names the rule
    video = images.new_zeros(b, 3, num_pixel_frames, height, width)  # zero = mid-grey in [-1, 1]
    video[:, :, 0] = images
    latents = codec.encode(video)
    mask = i2v_mask(frames, h, w, codec.temporal_stride, dtype=latents.dtype, device=latents.device)
    out: Cond = {"y": torch.cat([mask.expand(b, *mask.shape), latents], dim=1)}
    if image_encoder is not None:
        out["clip_fea"] = image_encoder.encode(images if clip_images is None else clip_images).float()
    return out
