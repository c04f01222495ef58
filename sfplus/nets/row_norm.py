"""A fused RMS norm (+ SiLU) over the contiguous channel rows of a channels-last video, written anywhere.

The Wan VAE normalises every activation over its channels (F.normalize · sqrt(C) · gamma), then applies a SiLU,
then a causal 3D convolution that needs two frames of history in front of the chunk. On the GPU the decoder is
memory-bound there: `F.rms_norm` on 96–384-channel rows reached about a fifth of the card's bandwidth (H200,
docs/performance.md), and joining history and chunk for the convolution copied every activation once more.

`rms_norm_silu_into(x, gamma, out)` does the norm and the SiLU in one Triton pass that reads x once and writes
`out` once, in fp32 inside. `out` may be a view into a larger buffer (the convolution's joined input), so the
concatenation copy disappears too. Available only with Triton on CUDA; callers check :func:`available` and keep
their PyTorch path otherwise (CPU, no Triton, autograd).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def _triton():
    try:
        import triton  # local: triton is optional (CUDA only); None without it
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def available(x: Tensor) -> bool:
    """True when the fused kernel can run on x: CUDA, Triton importable, no autograd needed."""
    return x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad) and _triton() is not None


@functools.cache
def _kernel():
    triton, tl = _triton()

    @triton.jit
    def rms_norm_silu_rows(x_ptr, w_ptr, y_ptr, rows, channels, x_batch_stride, y_batch_stride, scale,
                           SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # grid: (row blocks, batch). Rows of one sample are contiguous [rows, channels] in x and in y.
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        col = tl.arange(0, BLOCK_C)
        batch = tl.program_id(1).to(tl.int64)
        mask = (row[:, None] < rows) & (col[None, :] < channels)
        offsets = row[:, None] * channels + col[None, :]
        x = tl.load(x_ptr + batch * x_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        # F.normalize(x) * sqrt(C): x * sqrt(C) / max(||x||, 1e-12), exactly the original's formula
        inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        w = tl.load(w_ptr + col, mask=col < channels, other=0.0).to(tl.float32)
        y = x * inv[:, None] * w[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + batch * y_batch_stride + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    return rms_norm_silu_rows


def _rows_view_ok(t: Tensor) -> bool:
    """Each sample of a channels-last [B, C, *spatial] tensor must be one dense [positions, C] block."""
    b, c = t.shape[:2]
    positions = t[0].numel() // c
    if t.stride(1) != 1:
        return False
    # dense per sample: the spatial strides describe a contiguous [*spatial, C] layout
    expected = c
    for size, stride in sorted(zip(t.shape[2:], t.stride()[2:]), key=lambda p: p[1]):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return b == 1 or t.stride(0) >= positions * c


def rms_norm_silu_into(x: Tensor, gamma: Tensor, out: Tensor, silu: bool = True) -> Tensor:
    """out ← SiLU(F.normalize(x, dim=1) · sqrt(C) · gamma) in one pass (fp32 inside, stored in out's dtype).

    x, out: channels-last [B, C, *spatial] with the same shape (out may be a view into a bigger buffer, as long
    as each sample is dense); gamma: C values. Returns out.
    """
    if x.shape != out.shape:
        raise ValueError(f"rms_norm_silu_into: x {tuple(x.shape)} and out {tuple(out.shape)} differ")
    if not (_rows_view_ok(x) and _rows_view_ok(out)):
        raise ValueError("rms_norm_silu_into: x and out must be channels-last with dense samples")
    b, c = x.shape[:2]
    rows = x[0].numel() // c
    block_c = max(16, 1 << (c - 1).bit_length())
    block_r = max(1, 4096 // block_c)  # ~4k elements a program: enough bytes in flight, few registers
    grid = ((rows + block_r - 1) // block_r, b)
    _kernel()[grid](x, gamma.reshape(c).contiguous(), out, rows, c, x.stride(0), out.stride(0), float(c) ** 0.5,
                    SILU=silu, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
