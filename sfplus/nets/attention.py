"""One attention entry point for the Wan DiT (docs/wan_architecture.md, 'Attention backends').

Backends:
- "sdpa" (default): torch scaled_dot_product_attention; picks flash/cuDNN/efficient kernels on GPU by itself.
  Also takes a dense boolean `attn_mask` (True = attend), the portable fallback for block-causal masks.
- "flash": flash-attn 2 (`pip install sfplus[flash]`); inputs are cast to bf16 like official Wan.
- "flex": torch flex attention with a `BlockMask` (block-causal training mode). Compiled on CUDA, where the eager
  version would materialise the full score matrix; eager on CPU (fine for the tiny test sizes).

All take and return [B, L, heads, head_dim] (the DiT's layout), so the backend never changes tensor layouts upstream.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

__all__ = ["BACKENDS", "attention", "set_default_backend", "get_default_backend"]

BACKENDS = ("sdpa", "flash", "flex")
_default_backend = os.environ.get("SFPLUS_ATTENTION", "sdpa")


def set_default_backend(name: str) -> None:
    """Choose the backend used when `attention(..., backend=None)` gets no block mask ("sdpa" or "flash")."""
    global _default_backend
    _check_backend(name)
    _default_backend = name


def get_default_backend() -> str:
    return _default_backend


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        out = _compiled_flex()(q, k, v, block_mask=block_mask)
    else:
        with warnings.catch_warnings():  # "called without torch.compile": expected off-GPU
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex_attention(q, k, v, block_mask=block_mask)
    return out.transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_func  # local: flash-attn is the optional [flash] extra
    except ImportError as err:
        raise ValueError("attention backend 'flash' needs flash-attn: pip install 'sfplus[flash]'") from err
    dtype = q.dtype
    half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return flash_attn_func(q.to(half), k.to(half), v.to(half)).to(dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | None = None,
    block_mask=None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim).

    q [B, Lq, heads, head_dim]; k, v [B, Lk, heads, head_dim] -> [B, Lq, heads, head_dim] in q's dtype.
    block_mask: a flex-attention `BlockMask` (selects "flex" when backend is None).
    attn_mask: dense boolean [Lq, Lk] (True = attend), SDPA only.
    """
    if backend is None:
        backend = "flex" if block_mask is not None else _default_backend
    _check_backend(backend)
    if backend == "flex":
        if block_mask is None:
            raise ValueError("attention backend 'flex' needs a block_mask")
        return _flex(q, k, v, block_mask)
    if block_mask is not None:
        raise ValueError(f"block_mask given but backend is {backend!r}; use backend='flex' (or None)")
    if backend == "flash":
        if attn_mask is not None:
            raise ValueError("attention backend 'flash' takes no attn_mask; use 'sdpa' or 'flex'")
        return _flash(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2)
