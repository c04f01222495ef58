"""WanDiT: the Wan2.1 diffusion transformer (docs/wan_architecture.md, 'DiT', 'Causal DiT').

Parameter names are exactly those of the original Wan checkpoints (docs/wan_architecture.md, 'State dict'), so a
`diffusion_pytorch_model*.safetensors` state dict loads with `strict=True` and no key map (diffusers names:
`sfplus.weights.diffusers_keys`).

Numerics follow official Wan, independent of autocast: the time embedding and projection, the modulation adds,
`norm·(1+scale)+shift`, the gated residual adds and the whole head run in float32; LayerNorm/RMSNorm normalise in
float32; linears, the FFN and attention run in the dtype of their weights (bf16 when the weights are bf16). The residual
stream is float32 from the first block's first residual add on (as official Wan). The output is float32.

Call modes (same weights):
- full attention: `model(x, t, context)`;
- block-causal parallel (training): `model(x, t, context, causal=BlockCausal(...))`;
- KV-cache stepping (streaming inference / Self-Forcing rollouts):
  `model(x_block, t_block, context, kv_cache=cache, frame_offset=k)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sfplus.nets.attention import attention
from sfplus.nets.causal import BlockCausal, KVCache, KVCacheStep, block_causal_mask, teacher_forcing_mask
from sfplus.nets.rope import apply_rope, rope_cos_sin, rope_split
from sfplus.nets.sequence_parallel import SequenceShard

__all__ = ["WanConfig", "WanDiT", "sinusoidal_embedding"]


@dataclass
class WanConfig:
    """Architecture of a Wan2.1 DiT (defaults = the common Wan2.1 values, docs/wan_architecture.md,
    'Configurations')."""

    dim: int
    """Hidden size of the token stream."""
    ffn_dim: int
    """Hidden size of each block's feed-forward network."""
    num_heads: int
    """Attention heads; head_dim = dim // num_heads (128 in the real models)."""
    num_layers: int
    """Number of transformer blocks."""
    in_dim: int = 16
    """Input channels after concatenating y (16 for T2V; 36 = 16 noise + 4 mask + 16 image latent for I2V)."""
    out_dim: int = 16
    """Output (flow) channels."""
    text_dim: int = 4096
    """Width of the text-encoder features (umt5-xxl: 4096)."""
    freq_dim: int = 256
    """Size of the sinusoidal timestep embedding."""
    text_len: int = 512
    """Context rows: shorter contexts are zero-padded to this length (and the padded rows are attended)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(frames, height, width) patch of the Conv3d patch embedding."""
    eps: float = 1e-6
    """Epsilon of the block LayerNorms and RMSNorms."""
    qk_norm: bool = True
    """RMSNorm (across all heads) on queries and keys."""
    cross_attn_norm: bool = True
    """Affine LayerNorm `norm3` before cross-attention (Identity when False)."""
    image_dim: int | None = None
    """CLIP feature width for I2V (1280); enables `img_emb` and the image branch of cross-attention."""
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    """Largest grid position (+1) RoPE accepts on any axis (official table size)."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                     "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"WanConfig.patch_size must be three positive ints, got {self.patch_size!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"WanConfig.dim={self.dim} is not divisible by num_heads={self.num_heads} (head_dim must be an int)"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        rope_split(self.head_dim)  # raises for an unusable head_dim
        if self.image_dim is not None and self.image_dim <= 0:
            raise ValueError(f"WanConfig.image_dim must be positive or None, got {self.image_dim!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan timestep embedding: [N] raw timesteps (0..1000) -> [N, dim] float32, [cos, sin] with 10000^(-k/(dim/2)).

    Computed in float64 like official Wan (angles reach 1000 rad; float32 would lose ~1e-4).
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def run_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear in its weight dtype; under autocast, in autocast's. Layers that quantise their own input
    (`sfplus.nets.fp8.Fp8Linear`) name the dtype they take as `input_dtype`.

    Under autocast the input is left to autocast: casting a bf16 activation to the fp32 master weights' dtype
    first would only make an fp32 copy for autocast to cast back (1.1 GiB for the 1.3B FFN's hidden state at
    480x832x81, alive next to its bf16 twin while a checkpointed block is recomputed). The result is the same:
    bf16 -> fp32 -> bf16 is exact.
    """
    dtype = getattr(layer, "input_dtype", None)
    if dtype is None:
        if torch.is_autocast_enabled(x.device.type):
            return layer(x)
        dtype = layer.weight.dtype
    return layer(x.to(dtype))


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear in float32 whatever the weight dtype (official: fp32 autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), layer.weight.float(), bias)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: normalise in float32, cast back to the input dtype, then scale by `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 and cast back to the input dtype; optional affine weight/bias."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), (self.dim,), weight, bias, self.eps).to(x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, dim] -> [B, L, heads, head_dim]."""
    return x.unflatten(-1, (heads, -1))


class SelfAttention(nn.Module):
    """Self-attention with qk RMSNorm (across heads) and 3D RoPE. Keys: q, k, v, o, norm_q, norm_k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        block_mask=None,
        attn_mask: torch.Tensor | None = None,
        kv_step: KVCacheStep | None = None,
        layer: int = 0,
        sp: SequenceShard | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim] -> [B, L, dim] (weight dtype). cos/sin [L, head_dim/2] RoPE tables for these tokens.

        With `kv_step`, x holds only the current block's tokens; its keys/values are written (detached) into the
        cache and the queries attend to the cached earlier frames plus the block's own live keys/values.
        With `sp` (Ulysses), x holds this rank's tokens; q, k, v are traded for all tokens of heads/sp heads, so the
        masks and the KV cache see the global sequence (the cache holds this rank's heads only).
        """
        v = _split_heads(run_linear(self.v, x), self.num_heads)
        q = _split_heads(self.norm_q(run_linear(self.q, x)), self.num_heads)
        k = _split_heads(self.norm_k(run_linear(self.k, x)), self.num_heads)
        q = apply_rope(q, cos, sin).to(v.dtype)
        k = apply_rope(k, cos, sin).to(v.dtype)
        if sp is not None:  # one all-to-all for q, k, v: [B, L_local, H, 3d] -> [B, L, H/sp, 3d]
            q, k, v = sp.heads_to_sequence(torch.cat([q, k, v], dim=-1)).chunk(3, dim=-1)
        if kv_step is not None:
            k, v = kv_step.update(layer, k, v)
        out = attention(q, k, v, block_mask=block_mask, attn_mask=attn_mask)
        if sp is not None:
            out = sp.sequence_to_heads(out)
        return run_linear(self.o, out.flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention to the text context (+ CLIP image tokens for I2V), unmasked like official Wan.

    Keys: q, k, v, o, norm_q, norm_k and, for I2V, k_img, v_img, norm_k_img. The text and image branches share q;
    their attention outputs are summed before `o`.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.has_image = image
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def context_kv(self, context: torch.Tensor, context_img: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Keys/values of the (embedded) context: (k, v) or (k, v, k_img, v_img), each [B, Lc, heads, head_dim]."""
        kv = (
            _split_heads(self.norm_k(run_linear(self.k, context)), self.num_heads),
            _split_heads(run_linear(self.v, context), self.num_heads),
        )
        if self.has_image:
            if context_img is None:
                raise ValueError("I2V cross-attention needs image context (clip_fea)")
            kv += (
                _split_heads(self.norm_k_img(run_linear(self.k_img, context_img)), self.num_heads),
                _split_heads(run_linear(self.v_img, context_img), self.num_heads),
            )
        return kv

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x [B, L, dim], kv from `context_kv` -> [B, L, dim] (weight dtype)."""
        q = _split_heads(self.norm_q(run_linear(self.q, x)), self.num_heads)
        out = attention(q, kv[0], kv[1])
        if self.has_image:
            out = out + attention(q, kv[2], kv[3])
        return run_linear(self.o, out.flatten(2))


class CrossContext:
    """Embedded context handed to every block, which computes its own cross-attention keys/values inside its
    forward (so FSDP2 has gathered that block's weights), and collects them when a KV cache wants to keep them.
    """

    def __init__(self, context: torch.Tensor, context_img: torch.Tensor | None, num_layers: int, collect: bool):
        self.context, self.context_img = context, context_img
        self.collected: list | None = [None] * num_layers if collect else None

    def kv(self, attn: CrossAttention, layer: int) -> tuple[torch.Tensor, ...]:
        kv = attn.context_kv(self.context, self.context_img)
        if self.collected is not None:
            self._collect(layer, kv)
        return kv

    @torch.compiler.disable  # indexing by `layer` inside a compiled block would specialise it: one graph per layer
    def _collect(self, layer: int, kv: tuple[torch.Tensor, ...]) -> None:
        self.collected[layer] = kv  # type: ignore[index]


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention (norm3, no modulation), modulated FFN."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, config.qk_norm, eps, config.image_dim is not None)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context_kv: tuple[torch.Tensor, ...] | CrossContext,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        block_mask=None,
        attn_mask: torch.Tensor | None = None,
        kv_step: KVCacheStep | None = None,
        layer: int = 0,
        sp: SequenceShard | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim]; e0 [B, Tf, 6, dim] float32 (Tf = 1 or one row per frame, L divisible by Tf) -> [B, L, dim]."""
        b, length, dim = x.shape
        frames = e0.shape[1]
        mod = (self.modulation.float().unsqueeze(1) + e0).unsqueeze(3)  # [B, Tf, 6, 1, dim]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(2)  # each [B, Tf, 1, dim]

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return (h.float().view(b, frames, -1, dim) * (1 + scale) + shift).view(b, length, dim)

        def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return (y.float().view(b, frames, -1, dim) * gate).view(b, length, dim)

        y = self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa), cos, sin, block_mask=block_mask,
                           attn_mask=attn_mask, kv_step=kv_step, layer=layer, sp=sp)
        x = x + gated(y, gate_sa)
        if isinstance(context_kv, CrossContext):
            context_kv = context_kv.kv(self.cross_attn, layer)
        x = x + self.cross_attn(self.norm3(x), context_kv)
        h = modulate(self.norm2(x), shift_ff, scale_ff)
        y = run_linear(self.ffn[2], self.ffn[1](run_linear(self.ffn[0], h)))
        return x + gated(y, gate_ff)


class Head(nn.Module):
    """Output head: LayerNorm (no affine), modulation by the time embedding e, Linear to patch_volume·out_dim."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], e [B, Tf, dim] float32 -> [B, L, out_features] float32 (all in float32, as official)."""
        b, length, dim = x.shape
        frames = e.shape[1]
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        h = self.norm(x.float()).view(b, frames, -1, dim) * (1 + scale) + shift
        return _linear_fp32(self.head, h.view(b, length, dim))


class MLPProj(nn.Module):
    """I2V CLIP-feature projection `img_emb.proj` = [LayerNorm, Linear, GELU, Linear, LayerNorm] (LN eps 1e-5)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        """[B, N_img, image_dim] -> [B, N_img, dim] float32 (LayerNorms in float32, Linears in weight dtype)."""
        ln0, fc1, act, fc2, ln4 = self.proj
        ln = lambda m, h: F.layer_norm(h.float(), m.normalized_shape, m.weight.float(), m.bias.float(), m.eps)  # noqa: E731
        with torch.autocast(clip_fea.device.type, enabled=False):
            h = ln(ln0, clip_fea)
        h = run_linear(fc2, act(run_linear(fc1, h)))
        with torch.autocast(clip_fea.device.type, enabled=False):
            return ln(ln4, h)


class WanDiT(nn.Module):
    """Wan2.1 DiT (T2V and I2V) with full, block-causal and KV-cache call modes. See the module docstring."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(dim, config.patch_volume * config.out_dim, config.eps)
        if config.image_dim is not None:
            self.img_emb = MLPProj(config.image_dim, dim)
        self._mask_cache: dict[tuple, object] = {}
        self.sequence_parallel = None  # an SPGroup: split every forward's tokens (sfplus.nets.sequence_parallel)

    # ------------------------------------------------------------------ init and helpers
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter as official Wan trains from scratch (docs/wan_architecture.md, 'State dict');
        also valid after `to_empty`.

        xavier_uniform on Linears (bias 0), xavier on the flattened patch-embedding weight, N(0, 0.02) on the text
        and time embedding Linears, zero head.head weight, modulation ~ randn/sqrt(dim), norms to 1/0. The
        patch-embedding bias is set to 0 (official keeps PyTorch's default conv init; it is learned anyway).
        """
        dim = self.config.dim
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, LayerNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for module in seq:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            block.modulation.copy_(torch.randn_like(block.modulation) / dim**0.5)
        self.head.modulation.copy_(torch.randn_like(self.head.modulation) / dim**0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text features [B, L<=text_len, text_dim] -> zero-pad to text_len -> text_embedding -> [B, text_len, dim]."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, L, text_dim={cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} rows, more than text_len={cfg.text_len}")
        if context.shape[1] < cfg.text_len:  # padded rows are attended (official Wan), so pad before the MLP
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        lin1, act, lin2 = self.text_embedding
        return run_linear(lin2, act(run_linear(lin1, context)))

    def time_embed(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, frames] (0..1000) -> e [B, Tf, dim], e0 [B, Tf, 6, dim] float32 (Tf = 1 or frames)."""
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != batch or t.shape[1] not in (1, frames):
            raise ValueError(
                f"t must be [B={batch}] or per-frame [B={batch}, F={frames}] (post-patch frames), got {tuple(t.shape)}"
            )
        lin1, act, lin2 = self.time_embedding
        with torch.autocast(t.device.type, enabled=False):
            e = _linear_fp32(lin2, act(_linear_fp32(lin1, sinusoidal_embedding(t.flatten(), self.config.freq_dim))))
            e0 = _linear_fp32(self.time_projection[1], self.time_projection[0](e))
        dim = self.config.dim
        return e.view(batch, t.shape[1], dim), e0.view(batch, t.shape[1], 6, dim)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F'·H'·W', pt·ph·pw·out_dim] (c fastest) -> [B, out_dim, F'·pt, H'·ph, W'·pw]."""
        (pt, ph, pw), c = self.config.patch_size, self.config.out_dim
        f, h, w = grid
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=f, h=h, w=w, pt=pt, ph=ph, pw=pw, c=c)

    def _check_video(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if y is not None:
            if y.ndim != 5 or x.ndim != 5 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y {tuple(y.shape)} must be [B, C_y, F, H, W] matching x {tuple(x.shape)}")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            hint = "" if y is not None or cfg.in_dim == 16 else " (I2V: pass the 20-channel y)"
            raise ValueError(
                f"x (+ y) must be [B, in_dim={cfg.in_dim}, F, H, W], got {tuple(x.shape)}{hint}"
            )
        bad = [n for n, p in zip(x.shape[2:], cfg.patch_size) if n % p]
        if bad:
            raise ValueError(f"latent F, H, W {tuple(x.shape[2:])} must be divisible by patch_size {cfg.patch_size}")
        return x

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        causal: BlockCausal | None = None,
        kv_cache: KVCache | None = None,
        frame_offset: int = 0,
        return_hidden: tuple[int, ...] = (),
        clean_x: torch.Tensor | None = None,
        clean_t: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """Predict the flow v = noise - x0.

        x: [B, C, F, H, W] noisy latents (C = in_dim, or in_dim - C_y when y is given); F, H, W divisible by patch.
        t: [B] or per-frame [B, F'] timesteps on the 0..1000 scale (F' = F / patch_t = F for Wan2.1).
        context: [B, L<=text_len, text_dim] text features (zero-padded to text_len; padded rows are attended).
        clip_fea: [B, N_img (257), image_dim] CLIP features, required iff config.image_dim is set.
        y: [B, C_y, F, H, W] I2V conditioning (mask + image latent), concatenated after x on channels.
        causal: block-causal attention over frames (training-time parallel mode); excludes kv_cache.
        kv_cache: streaming mode: x holds the frames [frame_offset, frame_offset + F) only; see `KVCache`.
        frame_offset: absolute index of x's first (post-patch) frame; shifts the RoPE frame positions.
        return_hidden: block indices whose output token stream to return as well (GAN discriminator features).
        clean_x: teacher forcing in one parallel call (needs ``causal``): clean (or noise-augmented) latents like
            ``x``. The sequence is [clean frames ; noisy frames] with the same RoPE frame positions; noisy block j
            attends to clean blocks < j and to itself, the clean half is block-causal (`teacher_forcing_mask`).
            Gradients reach the clean half's keys and values. Only the noisy half is returned.
        clean_t: [B] or [B, F'] timesteps of the clean half (default 0).
        Returns: [B, out_dim, F, H, W] float32; with `return_hidden`, `(flow, hidden)` where hidden maps each
            requested block index to that block's output [B, L, dim] (L = F'·H'·W', frame-major) and "e" to the
            time embedding [B, Tf, dim] float32 (Tf = 1 or F').
        """
        cfg = self.config
        if causal is not None and kv_cache is not None:
            raise ValueError("pass either causal= (parallel block-causal) or kv_cache= (stepping), not both")
        if (clip_fea is None) != (cfg.image_dim is None):
            raise ValueError("clip_fea is required for an I2V model (image_dim set) and not accepted for T2V"
                             f" (image_dim={cfg.image_dim}, clip_fea {'missing' if clip_fea is None else 'given'})")
        wanted = self._check_hidden(return_hidden)
        x = self._check_video(x, y)
        batch = x.shape[0]
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        frames, tokens_per_frame = grid[0], grid[1] * grid[2]
        # Sequence parallel: this rank's share of every frame's tokens (the whole sequence without it).
        sp = None if self.sequence_parallel is None else SequenceShard(self.sequence_parallel, tokens_per_frame)
        local_per_frame = tokens_per_frame if sp is None else sp.local_tokens_per_frame

        w = self.patch_embedding.weight
        tokens = self.patch_embedding(x.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, L, dim], L = F'·H'·W'
        cos, sin = rope_cos_sin(grid, cfg.head_dim, frame_offset=frame_offset, theta=cfg.rope_theta,
                                max_positions=cfg.rope_max_positions, device=x.device)
        if clean_x is None:
            e, e0 = self.time_embed(t, batch, frames)
        else:  # teacher forcing: prepend the clean half (same RoPE positions, its own timesteps)
            clean_tokens, t, cos, sin = self._teacher_forcing_inputs(clean_x, clean_t, x, y, t, causal, kv_cache,
                                                                      frames, cos, sin)
            tokens = torch.cat([clean_tokens, tokens], dim=1)
            e, e0 = self.time_embed(t, batch, 2 * frames)

        block_mask = attn_mask = None
        if clean_x is not None:
            block_mask, attn_mask = self._causal_mask(causal, frames, tokens_per_frame, x.device, teacher_forcing=True)
        elif causal is not None:
            block_mask, attn_mask = self._causal_mask(causal, frames, tokens_per_frame, x.device)
        kv_step = None if kv_cache is None else kv_cache.begin(frame_offset, frames, tokens_per_frame, batch)

        if sp is not None:  # masks, the KV cache and `frames` stay global; tokens and their RoPE rows are split
            tokens, cos, sin = sp.split(tokens), sp.split_table(cos), sp.split_table(sin)

        context_kvs = self._context_kvs(context, clip_fea, kv_cache)
        hidden: dict = {}
        for i, block in enumerate(self.blocks):
            ctx_i = context_kvs if isinstance(context_kvs, CrossContext) else context_kvs[i]
            tokens = block(tokens, e0, ctx_i, cos, sin, block_mask=block_mask, attn_mask=attn_mask,
                           kv_step=kv_step, layer=i, sp=sp)
            if i in wanted:
                hidden[i] = tokens if sp is None else sp.gather(tokens)
        if isinstance(context_kvs, CrossContext) and context_kvs.collected is not None:
            kv_cache.set_cross(context_kvs.collected)
        if kv_cache is not None:
            kv_cache.commit(kv_step)
        if clean_x is not None:  # keep the noisy half
            tokens, e = tokens[:, frames * local_per_frame:], e[:, frames:]
            hidden = {i: h[:, frames * tokens_per_frame:] for i, h in hidden.items()}
        out = self.head(tokens, e)
        flow = self.unpatchify(out if sp is None else sp.gather(out), grid)
        if not wanted:
            return flow
        hidden["e"] = e
        return flow, hidden

    def _check_hidden(self, return_hidden) -> frozenset[int]:
        """Validate `return_hidden` (block indices in [0, num_layers)) and return it as a set."""
        n = len(self.blocks)
        try:
            wanted = frozenset(return_hidden)
        except TypeError:
            raise ValueError(f"return_hidden must be a tuple of block indices, got {return_hidden!r}") from None
        bad = sorted(str(i) for i in wanted if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n)
        if bad:
            raise ValueError(f"return_hidden has block indices {bad} outside [0, {n}) (the model has {n} blocks)")
        return wanted

    def _context_kvs(
        self, context, clip_fea, kv_cache: KVCache | None
    ) -> list[tuple[torch.Tensor, ...]] | CrossContext:
        """Cached per-block cross-attention keys/values (KV cache, grad off), or the embedded context from which
        each block computes its own inside its forward."""
        if kv_cache is not None and kv_cache.has_cross() and not torch.is_grad_enabled():
            return [kv_cache.cross(i) for i in range(len(self.blocks))]
        ctx = self.embed_context(context)
        ctx_img = None
        if clip_fea is not None:
            if clip_fea.ndim != 3 or clip_fea.shape[0] != ctx.shape[0] or clip_fea.shape[-1] != self.config.image_dim:
                raise ValueError(f"clip_fea must be [B, N_img, image_dim={self.config.image_dim}], "
                                 f"got {tuple(clip_fea.shape)}")
            ctx_img = self.img_emb(clip_fea)
        collect = kv_cache is not None and not kv_cache.has_cross()
        return CrossContext(ctx, ctx_img, len(self.blocks), collect)

    def _teacher_forcing_inputs(self, clean_x, clean_t, x, y, t, causal, kv_cache, frames, cos, sin):
        """Tokens of the clean half, timesteps [B, 2F'] (clean first) and the RoPE tables repeated for both halves."""
        if causal is None or kv_cache is not None:
            raise ValueError("clean_x (parallel teacher forcing) needs causal=BlockCausal(...) and no kv_cache")
        clean = self._check_video(clean_x, y)
        if clean.shape != x.shape:
            raise ValueError(f"clean_x (+ y) {tuple(clean.shape)} must match x (+ y) {tuple(x.shape)}")
        batch = x.shape[0]

        def per_frame(tt: torch.Tensor, name: str) -> torch.Tensor:
            tt = tt.to(x.device).float()
            tt = tt.expand(batch) if tt.ndim == 0 else tt
            tt = tt[:, None].expand(batch, frames) if tt.ndim == 1 else tt
            if tuple(tt.shape) != (batch, frames):
                raise ValueError(f"{name} must be [B={batch}] or [B={batch}, F={frames}], got {tuple(tt.shape)}")
            return tt

        t_clean = torch.zeros(batch, frames, device=x.device) if clean_t is None else per_frame(clean_t, "clean_t")
        w = self.patch_embedding.weight
        clean_tokens = self.patch_embedding(clean.to(w.dtype)).flatten(2).transpose(1, 2)
        both_t = torch.cat([t_clean, per_frame(t, "t")], dim=1)
        return clean_tokens, both_t, torch.cat([cos, cos]), torch.cat([sin, sin])

    def _causal_mask(self, causal: BlockCausal, frames: int, tokens_per_frame: int, device: torch.device,
                     teacher_forcing: bool = False):
        """Flex block mask, or dense bool mask when the backend resolves to sdpa; cached per shape and device."""
        key = (causal, frames, tokens_per_frame, str(device), teacher_forcing)
        if key not in self._mask_cache:
            if len(self._mask_cache) > 8:  # shapes rarely vary; keep the cache bounded anyway
                self._mask_cache.clear()
            make = teacher_forcing_mask if teacher_forcing else block_causal_mask
            self._mask_cache[key] = make(causal, frames, tokens_per_frame, device)
        mask = self._mask_cache[key]
        return (None, mask) if causal.resolve_backend(device) == "sdpa" else (mask, None)
