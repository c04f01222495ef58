"""Building blocks of the Wan2.1 video VAE (causal 3D convolutions with a chunk-to-chunk feature cache).

Module and parameter names follow the original `Wan2.1_VAE.pth` exactly (docs/wan_architecture.md, 'Layout'):
`residual.{0,2,3,6}`, `shortcut`, `resample.1`, `time_conv`, `norm`, `to_qkv`, `proj`, `head.{0,2}`, ...
Sequential indices of parameter-free layers (SiLU, Dropout, ZeroPad2d, Upsample) are kept so that the
parameterised layers land on the published indices.

Video tensors are [B, C, T, H, W]. Everything is causal in time: a frame only sees itself and earlier frames,
which is what lets a video be processed chunk by chunk (and decoded as a stream) with a small cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sfplus.nets import row_norm

# Frames of history a 3-tap causal temporal convolution needs from the previous chunk.
CACHE_T = 2


class CausalCache:
    """Temporal state carried from one chunk of a video to the next, one entry per stateful module.

    A fresh cache means "start of a video". Encoding and decoding each own one; a streaming decoder keeps its
    cache alive between calls. Entries are keyed by module identity, so one cache must only be used with the
    network it was first used with.
    """

    def __init__(self) -> None:
        self._state: dict[int, object] = {}

    def get(self, module: nn.Module) -> object | None:
        return self._state.get(id(module))

    def set(self, module: nn.Module, value: object) -> None:
        self._state[id(module)] = value

    def clear(self) -> None:
        self._state.clear()

    def __len__(self) -> int:
        return len(self._state)


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values, got {value!r}")
    return value  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and only on the past side in time.

    With a `cache`, the last `CACHE_T` input frames of the previous chunk replace (part of) the zero padding,
    so running a video chunk by chunk gives the same result as running it whole.

    Spatial zero padding is the convolution's own (no padded copy of the input); the temporal history and zero
    frames are joined to the input in one concatenation.

    Shapes: x [B, C_in, T, H, W] -> [B, C_out, T', H', W'] (T' = T for stride 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
    ) -> None:
        pad_t, pad_h, pad_w = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        # All 2·pad_t temporal padding goes before the first frame (causality).
        self.time_pad = 2 * pad_t

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        history, zeros = self._front(cache)
        parts = [x]
        if history is not None:
            parts.insert(0, history.to(x.device, x.dtype))
        if zeros > 0:
            # zeros_like keeps x's memory format (channels-last inputs stay channels-last through the cat)
            parts[:0] = [torch.zeros_like(x[:, :, :1])] * zeros
        joined = torch.cat(parts, dim=2) if len(parts) > 1 else x
        return self.forward_joined(joined, cache)

    def _front(self, cache: CausalCache | None) -> tuple[Tensor | None, int]:
        """What goes before the chunk in time: (cached history frames or None, number of zero frames)."""
        history = cache.get(self) if cache is not None and self.time_pad > 0 else None
        used = 0 if history is None else history.shape[2]  # type: ignore[union-attr]
        return history, max(self.time_pad - used, 0)  # type: ignore[return-value]

    def joined_buffer(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, Tensor]:
        """An uninitialised chunk with its history (or zero) frames already in front, in x's memory format.

        Returns (joined [B, C, front + T, H, W], tail): whoever produces this convolution's input writes it into
        `tail` (x's shape), then calls :meth:`forward_joined` — no concatenation copy.
        """
        history, zeros = self._front(cache)
        front = zeros + (0 if history is None else history.shape[2])
        b, c, t, h, w = x.shape
        fmt = torch.channels_last_3d if _channels_innermost(x) else torch.contiguous_format
        joined = torch.empty((b, c, front + t, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        if zeros:
            joined[:, :, :zeros].zero_()
        if history is not None:
            joined[:, :, zeros:front].copy_(history)
        return joined, joined[:, :, front:]

    def forward_joined(self, joined: Tensor, cache: CausalCache | None) -> Tensor:
        """The convolution of a chunk already joined to its temporal padding; updates the cache."""
        if cache is not None and self.time_pad > 0:
            # clone: do not keep the whole chunk alive through a view of it. (A leading zero frame may come along:
            # it is exactly the padding the next chunk would add.)
            cache.set(self, joined[:, :, -CACHE_T:].clone())
        return super().forward(joined)


class RMSNorm(nn.Module):
    """RMS norm over the channel dim: F.normalize(x, dim=1) · sqrt(C) · gamma (no bias, no extra eps).

    Computed in fp32 (design: norms in fp32) and cast back. `images=True` is the per-frame 2D variant used by
    the attention block (gamma [C, 1, 1]); otherwise gamma is [C, 1, 1, 1] for [B, C, T, H, W] input.
    `forward(x, silu=True)` applies the SiLU that follows every norm of the VAE before the cast (one fp32 pass
    fewer). Channels-last input runs as a row-wise `F.rms_norm` (`WanVAE.use_channels_last`).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # Inside a Sequential run by `_run`: may use the fused Triton kernel when it can (WanVAE.use_fused_norms).
        self.fused_kernel = False
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        if _channels_innermost(x):
            return _rms_norm_channels_last(x, self.gamma, silu)
        return _rms_norm(x, self.gamma, silu)


def _rms_norm(x: Tensor, gamma: Tensor, silu: bool) -> Tensor:
    """fp32 F.normalize over channels · sqrt(C) · gamma (then SiLU), cast back to x's dtype."""
    y = F.normalize(x.float(), dim=1) * (gamma.float() * x.shape[1] ** 0.5)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _channels_innermost(x: Tensor) -> bool:
    """True for channels-last tensors (NDHWC / NHWC storage), whose channels are contiguous per position."""
    fmt = torch.channels_last_3d if x.ndim == 5 else torch.channels_last if x.ndim == 4 else None
    return fmt is not None and x.shape[1] > 1 and x.is_contiguous(memory_format=fmt) and not x.is_contiguous()


def _rms_norm_channels_last(x: Tensor, gamma: Tensor, silu: bool) -> Tensor:
    """The same norm on channels-last storage, as a row-wise `F.rms_norm` over the contiguous channel dim (fp32
    statistics inside; one fused kernel on CUDA), SiLU in place. x / max(|x|, 1e-12) · sqrt(C) equals
    x · rsqrt(mean(x²) + eps) with eps = 1e-24 / C; gamma is applied in x's dtype. Returns channels-last."""
    c = x.shape[1]
    y = F.rms_norm(x.movedim(1, -1), (c,), weight=gamma.reshape(c).to(x.dtype), eps=1e-24 / c)
    if silu:
        y = F.silu(y, inplace=True)
    return y.movedim(-1, 1)


class ResidualBlock(nn.Module):
    """norm → SiLU → causal conv 3³ → norm → SiLU → dropout → causal conv 3³, plus a 1³ shortcut if in ≠ out.

    x [B, in_dim, T, H, W] -> [B, out_dim, T, H, W].
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        return _run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (no mixing across time), with a residual.

    x [B, C, T, H, W] -> same shape; H·W tokens per frame, scale 1/sqrt(C).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        t = x.shape[2]
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = self.to_qkv(self.norm(frames))  # [(B·T), 3C, H, W]
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # each [(B·T), 1, H·W, C]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(frames.shape)  # contiguous [(B·T), C, H, W] for proj
        out = rearrange(self.proj(out), "(b t) c h w -> b c t h w", t=t)
        return x + out


class _Upsample2x(nn.Upsample):
    """Nearest ×2 upsampling. The original computes it in fp32 and casts back; nearest only copies values, so
    running it in the input's dtype gives the same bits with two passes fewer."""


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nn.Module):
    """Spatial ×2 down/up-sampling per frame, optionally with ×2 temporal down/up-sampling.

    - downsample2d/3d: pad right/bottom by 1, Conv2d 3×3 stride 2 (C → C). The 3d mode then merges frame pairs
      with `time_conv` (kernel 3 over [last frame of the previous chunk | this chunk], stride 2); the very first
      chunk skips it, so frame 0 is kept alone: T frames → 1 + (T-1)/2 over a whole video.
    - upsample2d/3d: nearest ×2, Conv2d 3×3 (C → C/2). The 3d mode first runs `time_conv` (C → 2C, causal,
      cached) and interleaves the two halves as frames 2k, 2k+1; the very first chunk skips it, so the first
      latent frame is not doubled: T frames → 1 + 2(T-1) over a whole video.

    The first-chunk special cases are what make the stride-s codec map 1 + s·k frames to 1 + k latents.
    x [B, C, T, H, W] -> [B, C or C/2, T', 2H or H/2, 2W or W/2].
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                _Upsample2x(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _require_cache(self, cache: CausalCache | None) -> CausalCache:
        if cache is None:
            raise ValueError(f"Resample({self.mode}) changes the frame count chunk by chunk and needs a CausalCache")
        return cache

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        if self.mode == "upsample3d":
            cache = self._require_cache(cache)
            if cache.get(self) is None:
                cache.set(self, True)  # first chunk: no temporal doubling
            else:
                b, c, t, h, w = x.shape
                # time_conv's own cache starts empty on the second chunk: the first latent frame is not
                # part of its history (zero padding instead), as in the original model.
                y = self.time_conv(x, cache)  # [B, 2C, T, H, W]
                x = _interleave_frames(y[:, :c], y[:, c:])

        y = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
        x = rearrange(y, "(b t) c h w -> b c t h w", t=x.shape[2])

        if self.mode == "downsample3d":
            cache = self._require_cache(cache)
            previous = cache.get(self)
            cache.set(self, x[:, :, -1:].clone())
            if previous is not None:  # first chunk: frame 0 passes through alone
                x = self.time_conv(torch.cat([previous.to(x.dtype), x], dim=2))  # type: ignore[union-attr]
        return x


def _interleave_frames(even: Tensor, odd: Tensor) -> Tensor:
    """[B, C, T, H, W] twice -> [B, C, 2T, H, W] with frames even[0], odd[0], even[1], ... in the inputs' memory
    format (a reshape would silently turn channels-last into channels-first)."""
    b, c, t, h, w = even.shape
    fmt = torch.channels_last_3d if _channels_innermost(even) else torch.contiguous_format
    out = torch.empty((b, c, 2 * t, h, w), dtype=even.dtype, device=even.device, memory_format=fmt)
    out[:, :, 0::2] = even
    out[:, :, 1::2] = odd
    return out


def _run(layers: nn.Sequential, x: Tensor, cache: CausalCache | None) -> Tensor:
    """Run a Sequential of blocks, passing the cache to those that take one (all but SiLU/norms/dropout).

    An RMSNorm directly followed by a SiLU runs as one `norm(x, silu=True)` call. Where the fused row-norm kernel
    can run (CUDA, Triton, channels-last, inference), norm → SiLU → [identity dropout] → causal conv writes the
    normalised activation straight into the convolution's joined input (`sfplus.nets.row_norm`).
    """
    i, n = 0, len(layers)
    while i < n:
        layer = layers[i]
        if isinstance(layer, RMSNorm):
            silu = i + 1 < n and isinstance(layers[i + 1], nn.SiLU)
            conv_at = _conv_after_norm_silu(layers, i) if silu else None
            if conv_at is not None and layer.fused_kernel and _fused_norm_ok(x):
                x = _norm_silu_conv(layer, layers[conv_at], x, cache)
                i = conv_at + 1
                continue
            x = layer(x, silu=silu)
            i += 2 if silu else 1
        elif isinstance(layer, (nn.SiLU, nn.Dropout)):
            x = layer(x)
            i += 1
        else:
            x = layer(x, cache)
            i += 1
    return x


def _conv_after_norm_silu(layers: nn.Sequential, norm_at: int) -> int | None:
    """Index of the CausalConv3d that follows norm, SiLU and identity dropouts, or None."""
    j = norm_at + 2
    while j < len(layers) and isinstance(layers[j], nn.Dropout) and (layers[j].p == 0 or not layers[j].training):
        j += 1
    return j if j < len(layers) and isinstance(layers[j], CausalConv3d) else None


def _fused_norm_ok(x: Tensor) -> bool:
    return x.ndim == 5 and _channels_innermost(x) and row_norm.available(x)


def _norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: Tensor, cache: CausalCache | None) -> Tensor:
    """conv(SiLU(norm(x))) with the norm written into the convolution's joined input (one pass, no copy)."""
    joined, tail = conv.joined_buffer(x, cache)
    row_norm.rms_norm_silu_into(x, norm.gamma, tail, silu=True)
    return conv.forward_joined(joined, cache)


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


class Encoder3d(nn.Module):
    """Pixels [B, 3, T, H, W] (one chunk) -> [B, out_channels, T', H/s, W/s] with the cache carrying history.

    Layout (official `Encoder3d`): conv1, then per stage i: num_res_blocks ResidualBlocks (+ AttentionBlock at
    scales in `attn_scales`) and a Resample (all stages but the last), then middle [RB, Attn, RB] and head.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        attn_scales: Sequence[float],
        temporal_downsample: Sequence[bool],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1], dropout)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], out_channels, 3, padding=1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.head, x, cache)


class Decoder3d(nn.Module):
    """Latents [B, z_dim, T', h, w] (one chunk) -> pixels [B, 3, T, h·s, w·s] with the cache carrying history.

    Layout (official `Decoder3d`): conv1, middle, then per stage i: num_res_blocks + 1 ResidualBlocks (+ attn)
    and a Resample (all stages but the last; it halves the channels, hence in_dim // 2 for stages after the
    first), then head.
    """

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        attn_scales: Sequence[float],
        temporal_upsample: Sequence[bool],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *reversed(dim_mult)]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run(self.head, x, cache)
