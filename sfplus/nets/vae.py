"""Wan2.1 video VAE: chunked causal encode, frame-by-frame decode, and a streaming decoder.

`WanVAE()` with default arguments is the published Wan2.1 VAE: its `state_dict()` has exactly the keys and
shapes of `Wan2.1_VAE.pth` (194 tensors, 126,892,531 parameters), so the file loads with `strict=True`
(docs/wan_architecture.md, 'VAE'). Smaller configurations (base `dim`, `z_dim`, `dim_mult`, `num_res_blocks`,
`temporal_downsample`) build tiny same-class models for tests.

Conventions (docs/wan_architecture.md, 'Chunked causal processing', 'Latent normalisation'):
- pixels [B, 3, T, H, W] in [-1, 1], T = 1 + s·k (s = temporal stride, 4 for Wan2.1), H and W multiples of the
  spatial stride (8 for Wan2.1);
- latents [B, z_dim, 1 + k, H/8, W/8], normalised per channel with the published mean/std — the DiT only ever
  sees normalised latents;
- encoding runs frame 0 alone, then chunks of s frames (each chunk → one latent frame) and keeps the posterior
  mean; decoding runs one latent frame at a time (the first → 1 frame, each later one → s frames) and clamps
  to [-1, 1].
Computation runs in the weights' dtype (fp32 or bf16); latent normalisation runs in fp32; outputs come back in
the input's dtype.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from sfplus.file_checks import DamagedFileError, load_safetensors, torch_load
from sfplus.nets.vae_blocks import CausalCache, CausalConv3d, Decoder3d, Encoder3d, RMSNorm
from sfplus.weights.vae_keys import diffusers_vae_to_wan, is_diffusers_vae_state_dict

# Per-channel statistics of Wan2.1 VAE posterior means (channel order 0..15), docs/wan_architecture.md, 'Latent
# normalisation'.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class VAEWeightsError(DamagedFileError):
    """A VAE weights file that is missing, damaged or not a state dict."""


class VideoShapeError(ValueError):
    """A video or latent tensor whose shape the VAE cannot process (wrong rank, channels or frame count)."""


class WanVAE(nn.Module):
    """The Wan2.1 causal 3D VAE with the original parameter names.

    Args:
        dim: base channel count (96 for Wan2.1).
        z_dim: latent channels (16).
        dim_mult: channel multiplier per stage; len(dim_mult) - 1 spatial ×2 down/up-samplings.
        num_res_blocks: residual blocks per encoder stage (decoder stages get one more).
        attn_scales: scales (1, 1/2, ...) with extra attention blocks; empty for Wan2.1.
        temporal_downsample: per resampling stage, whether it also halves time ((False, True, True) → ×4).
        dropout: dropout inside residual blocks (0 for Wan2.1).
        latents_mean, latents_std: per-channel normalisation; default the Wan2.1 values when z_dim == 16,
            otherwise identity (0 and 1).

    Submodules (and state-dict prefixes): `encoder`, `conv1` (1³ conv on the 2·z_dim posterior moments),
    `conv2` (1³ conv on z before the decoder), `decoder`.
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temporal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        dim_mult, temporal_downsample = tuple(dim_mult), tuple(bool(t) for t in temporal_downsample)
        if len(dim_mult) < 2:
            raise ValueError(f"WanVAE: dim_mult needs at least 2 stages, got {dim_mult}")
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(
                f"WanVAE: temporal_downsample needs one entry per resampling stage "
                f"(len(dim_mult) - 1 = {len(dim_mult) - 1}), got {temporal_downsample}"
            )
        if latents_mean is None:
            latents_mean = WAN21_LATENT_MEAN if z_dim == 16 else (0.0,) * z_dim
        if latents_std is None:
            latents_std = WAN21_LATENT_STD if z_dim == 16 else (1.0,) * z_dim
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(
                f"WanVAE: latents_mean/latents_std need z_dim = {z_dim} values, "
                f"got {len(latents_mean)} and {len(latents_std)}"
            )
        if any(s <= 0 for s in latents_std):
            raise ValueError(f"WanVAE: latents_std must be positive, got {tuple(latents_std)}")

        self.z_dim = z_dim
        self.temporal_stride = 2 ** sum(temporal_downsample)
        self.spatial_stride = 2 ** (len(dim_mult) - 1)
        # Plain tuples, not buffers: they must stay fp32 when the weights go to bf16, and must not appear in
        # the state dict (the published file has no such keys).
        self.latents_mean = tuple(float(m) for m in latents_mean)
        self.latents_std = tuple(float(s) for s in latents_std)

        self.encoder = Encoder3d(
            dim, 2 * z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample, dropout
        )
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(
            dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample[::-1], dropout
        )
        # Latent frames per decoder call after the first frame (which runs alone: its temporal upsampling is
        # special). Any value gives the same video; more frames per call keep the GPU busier and cost memory.
        self.decode_chunk_frames = 4
        self.channels_last = False
        # Let cuDNN time its convolution algorithms for each decoder shape (once per shape, then cached): ~8 %
        # faster decoding on an H200. Only switched on around the decoder's convolutions.
        self.cudnn_benchmark = True

    # ---------------------------------------------------------------- speed
    def use_channels_last(self, enabled: bool = True) -> WanVAE:
        """Store conv weights and run activations channels-last (NDHWC): cuDNN's fastest 3D convolution kernels
        need no layout transposes, and the channel-wise norms reduce over contiguous memory. Same results."""
        fmt3, fmt2 = (torch.channels_last_3d, torch.channels_last) if enabled else (torch.contiguous_format,) * 2
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Conv2d)):
                fmt = fmt3 if isinstance(module, nn.Conv3d) else fmt2
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        self.channels_last = enabled
        return self

    def use_fused_norms(self, enabled: bool = True) -> WanVAE:
        """Let norm → SiLU → causal conv run as one Triton pass into the convolution's joined input where it can
        (CUDA, Triton, channels-last, no autograd; `sfplus.nets.row_norm`); elsewhere the PyTorch path runs.
        `load_wan_vae` turns it on for CUDA models (decode of 21 latents at 480x832: 1.078 s → 0.865 s on an H100,
        docs/performance.md). Same formula, fp32 inside; `use_fused_norms(False)` gives the PyTorch path."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused_kernel = enabled
        return self

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    # ---------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """mean, 1/std as fp32 [1, z_dim, 1, 1, 1] on `like`'s device (1/std as the original computes it)."""
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        inv_std = 1.0 / torch.tensor(self.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, inv_std

    def normalize_latents(self, mu: Tensor) -> Tensor:
        """Raw posterior mean [B, z_dim, F, h, w] -> normalised latents (fp32): (mu - mean) / std."""
        mean, inv_std = self._stats(mu)
        return (mu.float() - mean) * inv_std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """Normalised latents -> raw decoder input (fp32): z · std + mean."""
        mean, inv_std = self._stats(z)
        return z.float() / inv_std + mean

    def num_latent_frames(self, num_frames: int) -> int:
        """T pixel frames -> 1 + (T - 1) / s latent frames; raises VideoShapeError unless T = 1 + s·k."""
        s = self.temporal_stride
        if num_frames < 1 or (num_frames - 1) % s:
            raise VideoShapeError(
                f"WanVAE: a video needs 1 + {s}·k frames (1, {1 + s}, {1 + 2 * s}, ...), got {num_frames}"
            )
        return 1 + (num_frames - 1) // s

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """F latent frames -> 1 + s·(F - 1) pixel frames."""
        return 1 + self.temporal_stride * (num_latent_frames - 1)

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise VideoShapeError(f"WanVAE.encode: expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        self.num_latent_frames(video.shape[2])
        s = self.spatial_stride
        if video.shape[3] % s or video.shape[4] % s:
            raise VideoShapeError(
                f"WanVAE.encode: height and width must be multiples of {s}, got {video.shape[3]}x{video.shape[4]}"
            )

    # ---------------------------------------------------------------- encode / decode
    def encode_moments(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Raw posterior (mu, log_var), each [B, z_dim, 1 + (T-1)/s, H/8, W/8], in the weights' dtype.

        Frame 0 runs alone, then chunks of s frames, with the causal cache carrying history between chunks.
        """
        self._check_video(video)
        x = self._layout(video.to(self.dtype))
        s = self.temporal_stride
        cache = CausalCache()
        chunks = [x[:, :, :1]] + list(x[:, :, 1:].split(s, dim=2))
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu, log_var = self.conv1(out).chunk(2, dim=1)
        return mu, log_var

    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, T, H, W] in [-1, 1] (T = 1 + s·k) -> normalised posterior mean [B, z_dim, 1 + k, H/8, W/8].

        Returned in the input's dtype.
        """
        mu, _ = self.encode_moments(video)
        return self.normalize_latents(mu).to(video.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """normalised latents [B, z_dim, F, h, w] -> pixels [B, 3, 1 + s·(F-1), h·8, w·8] clamped to [-1, 1].

        Returned in the input's dtype. Same as one call of a fresh `StreamingDecoder`.
        """
        return StreamingDecoder(self).decode(latents)

    def stream_decoder(self) -> StreamingDecoder:
        """A decoder that keeps the causal caches between calls (see `StreamingDecoder`)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decode latents block by block; the causal caches carry over, so blocks concatenate seamlessly.

    `decode(block)` with block [B, z_dim, n, h, w] (normalised latents, n ≥ 1) returns the pixel frames of
    those latent frames: 1 + s·(n-1) for the first block of the stream, s·n for every later one. The
    concatenation over a sequence of blocks equals `vae.decode` of the concatenated latents. Keep batch size
    and spatial size fixed within one stream; `reset()` starts a new video.

    Under autograd the caches keep the previous block's graph alive: stream under `torch.no_grad()` unless
    gradients across blocks are wanted.
    """

    def __init__(self, vae: WanVAE, chunk_frames: int | None = None) -> None:
        self.vae = vae
        self.chunk_frames = int(vae.decode_chunk_frames if chunk_frames is None else chunk_frames)
        if self.chunk_frames < 1:
            raise ValueError(f"StreamingDecoder: chunk_frames must be >= 1, got {self.chunk_frames}")
        self.cache = CausalCache()
        self.latent_frames_done = 0
        self._shape: tuple[int, int, int] | None = None

    def reset(self) -> None:
        self.cache.clear()
        self.latent_frames_done = 0
        self._shape = None

    def decode(self, block: Tensor) -> Tensor:
        vae = self.vae
        if block.ndim != 5 or block.shape[1] != vae.z_dim or block.shape[2] < 1:
            raise VideoShapeError(
                f"StreamingDecoder.decode: expected latents [B, {vae.z_dim}, n>=1, h, w], got {tuple(block.shape)}"
            )
        shape = (block.shape[0], block.shape[3], block.shape[4])
        if self._shape is not None and shape != self._shape:
            raise VideoShapeError(
                f"StreamingDecoder.decode: (batch, h, w) changed mid-stream from {self._shape} to {shape}; "
                f"call reset() to start a new video"
            )
        self._shape = shape
        z = vae.conv2(vae._layout(vae.denormalize_latents(block).to(vae.dtype)))
        # The stream's first latent frame runs alone (its temporal upsampling is special, as in the original);
        # the rest in chunks of `decode_chunk_frames`, which the causal caches make equal to frame-by-frame.
        first = 1 if self.latent_frames_done == 0 else 0
        chunks = [z[:, :, :1]] if first else []
        if z.shape[2] > first:
            chunks += list(z[:, :, first:].split(self.chunk_frames, dim=2))
        with _cudnn_benchmark(vae.cudnn_benchmark and z.is_cuda):
            frames = [vae.decoder(chunk, self.cache) for chunk in chunks]
        self.latent_frames_done += block.shape[2]
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0).to(block.dtype).contiguous()


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """torch.backends.cudnn.benchmark switched on (if `enabled`) for the block, then restored."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = old or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def load_wan_vae(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **config,
) -> WanVAE:
    """Build a WanVAE (default: the Wan2.1 config; `config` overrides constructor args) and load weights.

    `path` may be the original `Wan2.1_VAE.pth`, a `.safetensors` file with original or diffusers keys, or a
    diffusers folder (a model folder with `vae/`, or the `vae/` folder itself; its config.json is used when no
    `config` is given). The load is strict.
    Weights are read with `weights_only=True`; the model is built on the meta device, so nothing is
    initialised twice.
    """
    state = read_vae_state_dict(path)
    folder = Path(path) / "vae" if (Path(path) / "vae").is_dir() else Path(path)
    if not config and (folder / "config.json").is_file():
        config = wan_vae_config_from_diffusers(folder / "config.json")
    if is_diffusers_vae_state_dict(state):
        state = diffusers_vae_to_wan(state)
    with torch.device("meta"):
        vae = WanVAE(**config)
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"load_wan_vae: {path} does not match WanVAE({config}): {err}") from err
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if vae.conv1.weight.is_cuda:  # same results, faster kernels (docs/performance.md: decode 0.47x the reference)
        vae.use_channels_last().use_fused_norms()
    return vae


def read_vae_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a VAE state dict from a .pth/.pt/.safetensors file or a diffusers (vae) folder."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"read_vae_state_dict: no .safetensors file in {folder}")
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(_read_file(file))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"read_vae_state_dict: {path} does not exist")
    return _read_file(path)


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path, "VAE weights", VAEWeightsError)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = torch_load(path, "VAE weights", VAEWeightsError)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise VAEWeightsError(f"VAE weights {path} hold a {type(state).__name__}, not a state dict")
        return dict(state)
    raise ValueError(f"read_vae_state_dict: unsupported file type {path.suffix!r} ({path})")


def wan_vae_config_from_diffusers(config_json: str | Path) -> dict:
    """Constructor kwargs for WanVAE from a diffusers `AutoencoderKLWan` config.json (Wan2.1 layout only)."""
    cfg = json.loads(Path(config_json).read_text())
    if cfg.get("is_residual") or cfg.get("patch_size") not in (None, 1):
        raise ValueError(f"{config_json}: a Wan2.2-style VAE (is_residual / patch_size) is not the Wan2.1 VAE")
    if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", 96)):
        raise ValueError(f"{config_json}: decoder_base_dim != base_dim is not supported")
    return {
        "dim": cfg.get("base_dim", 96),
        "z_dim": cfg.get("z_dim", 16),
        "dim_mult": tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        "num_res_blocks": cfg.get("num_res_blocks", 2),
        "attn_scales": tuple(cfg.get("attn_scales", ())),
        "temporal_downsample": tuple(cfg.get("temperal_downsample", (False, True, True))),
        "dropout": cfg.get("dropout", 0.0),
        "latents_mean": cfg.get("latents_mean"),
        "latents_std": cfg.get("latents_std"),
    }
