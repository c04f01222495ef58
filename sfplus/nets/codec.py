"""Video codecs: what turns pixels into the latents the DiT works on, and back.

The rest of sfplus only sees the `VideoCodec` protocol:
- `IdentityCodec`: latents are the pixels (3 channels, strides 1).
- `TimePackCodec`: latents are the pixels with every s consecutive frames stacked along the channels (3·s
  channels, time ×s, lossless); the built-in toy teacher uses s = 4, a stand-in for the Wan VAE's ×4 time
  compression that puts a clip's short-range motion inside one latent token.
- `WanVAECodec`: the Wan2.1 VAE (16 channels, time ×4, space ×8), normalised latents.

Pixels are [B, 3, T, H, W] in [-1, 1]; latents are [B, C, F, h, w] with F = 1 + (T-1)/temporal_stride (the
first frame alone, as Wan; `first_frame_alone = True`) or F = T/temporal_stride (`TimePackCodec`), and
h, w = H, W / spatial_stride. Decoded pixels are clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from einops import rearrange
from torch import Tensor, nn

from sfplus.nets.vae import StreamingDecoder, VideoShapeError, WanVAE

__all__ = [
    "IdentityCodec",
    "StreamDecoder",
    "TimePackCodec",
    "toy_codec",
    "VideoCodec",
    "VideoShapeError",
    "WanVAECodec",
    "latent_shape",
]


@runtime_checkable
class StreamDecoder(Protocol):
    """Decodes consecutive latent blocks [B, C, n, h, w] of one video; returns the new pixel frames."""

    def decode(self, block: Tensor) -> Tensor: ...


@runtime_checkable
class VideoCodec(Protocol):
    """Pixels [B, 3, T, H, W] in [-1, 1] <-> latents [B, latent_channels, F, h, w]."""

    latent_channels: int
    temporal_stride: int
    spatial_stride: int

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def stream_decoder(self) -> StreamDecoder: ...


def latent_shape(codec: VideoCodec, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F, h, w) of the latents of a num_frames × height × width video; VideoShapeError if not encodable."""
    s, ss = codec.temporal_stride, codec.spatial_stride
    name = type(codec).__name__
    if not getattr(codec, "first_frame_alone", True):  # runs of s frames
        if num_frames < s or num_frames % s:
            raise VideoShapeError(f"{name}: a video needs a multiple of {s} frames, got {num_frames}")
        frames = num_frames // s
    else:  # frame 0 alone, then runs of s (Wan)
        if num_frames < 1 or (num_frames - 1) % s:
            raise VideoShapeError(
                f"{name}: a video needs 1 + {s}·k frames (1, {1 + s}, {1 + 2 * s}, ...), got {num_frames}"
            )
        frames = 1 + (num_frames - 1) // s
    if height % ss or width % ss or height < ss or width < ss:
        raise VideoShapeError(f"{name}: height and width must be positive multiples of {ss}, got {height}x{width}")
    return codec.latent_channels, frames, height // ss, width // ss


def _check_video(codec: VideoCodec, video: Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise VideoShapeError(
            f"{type(codec).__name__}.encode: expected video [B, 3, T, H, W], got {tuple(video.shape)}"
        )
    latent_shape(codec, *video.shape[2:])


def _check_latents(codec: VideoCodec, latents: Tensor) -> None:
    if latents.ndim != 5 or latents.shape[1] != codec.latent_channels or latents.shape[2] < 1:
        raise VideoShapeError(
            f"{type(codec).__name__}.decode: expected latents [B, {codec.latent_channels}, F>=1, h, w], "
            f"got {tuple(latents.shape)}"
        )


class IdentityCodec(nn.Module):
    """Latents are the pixels: encode returns the video itself (no copy), decode clamps to [-1, 1]."""

    latent_channels = 3
    temporal_stride = 1
    spatial_stride = 1

    def encode(self, video: Tensor) -> Tensor:
        _check_video(self, video)
        return video

    def decode(self, latents: Tensor) -> Tensor:
        _check_latents(self, latents)
        return latents.clamp(-1.0, 1.0)

    def stream_decoder(self) -> _IdentityStream:
        return _IdentityStream(self)


class _IdentityStream:
    def __init__(self, codec: IdentityCodec) -> None:
        self.codec = codec

    def decode(self, block: Tensor) -> Tensor:
        return self.codec.decode(block)


class TimePackCodec(nn.Module):
    """Latents are the pixels with each run of s frames stacked along the channels: [B, 3, s·k, H, W] <->
    [B, 3·s, k, H, W], channel c·s + j holding colour c of frame j of the run. Lossless (decode clamps).

    The toy's stand-in for a video VAE's temporal compression: Wan's VAE folds 4 frames into each latent frame,
    so a DiT sees short-range motion inside a token rather than as a relation between tokens. With the identity
    codec a tiny DiT learned the toy's colours but never its prompt's motion direction (docs/toy_results.md);
    with s = 4 it does.
    """

    first_frame_alone = False
    spatial_stride = 1

    def __init__(self, frames_per_latent: int = 4) -> None:
        super().__init__()
        if int(frames_per_latent) != frames_per_latent or frames_per_latent < 1:
            raise ValueError(f"TimePackCodec: frames_per_latent must be a positive integer, got {frames_per_latent!r}")
        self.temporal_stride = int(frames_per_latent)
        self.latent_channels = 3 * self.temporal_stride

    def encode(self, video: Tensor) -> Tensor:
        _check_video(self, video)  # also: a multiple of s frames
        return rearrange(video, "b c (k s) h w -> b (c s) k h w", s=self.temporal_stride)

    def decode(self, latents: Tensor) -> Tensor:
        _check_latents(self, latents)
        return rearrange(latents, "b (c s) k h w -> b c (k s) h w", s=self.temporal_stride).clamp(-1.0, 1.0)

    def stream_decoder(self) -> _IdentityStream:
        return _IdentityStream(self)  # type: ignore[arg-type]  # each latent frame decodes on its own


def toy_codec(frames_per_latent: int = 1) -> IdentityCodec | TimePackCodec:
    """The built-in toy task's codec: the identity for 1 frame per latent frame, else `TimePackCodec`."""
    return IdentityCodec() if frames_per_latent == 1 else TimePackCodec(frames_per_latent)


class WanVAECodec(nn.Module):
    """The Wan2.1 VAE as a `VideoCodec` (normalised latents; see `sfplus.nets.vae.WanVAE`).

    An nn.Module so that `.to()`, `.eval()` and Lightning's device moves reach the VAE (`self.vae`).
    """

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return self.vae.z_dim

    @property
    def temporal_stride(self) -> int:
        return self.vae.temporal_stride

    @property
    def spatial_stride(self) -> int:
        return self.vae.spatial_stride

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> [B, 16, 1 + k, H/8, W/8] (Wan2.1 sizes)."""
        _check_video(self, video)
        return self.vae.encode(video)

    def decode(self, latents: Tensor) -> Tensor:
        """[B, 16, F, h, w] -> [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1] (Wan2.1 sizes)."""
        _check_latents(self, latents)
        return self.vae.decode(latents)

    def stream_decoder(self) -> StreamingDecoder:
        return self.vae.stream_decoder()
