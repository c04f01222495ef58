"""3D rotary position embedding of Wan2.1 (docs/wan_architecture.md, '3D RoPE'), in real arithmetic.

Each attention head of size d splits its d/2 adjacent channel pairs (2i, 2i+1) into three groups with their own
frequency bases: frame axis t_dim = d - 4·(d//6) channels, height and width 2·(d//6) channels each (44/42/42 for
d = 128). A token at grid position (f, h, w) rotates pair i of group g by angle pos_g · theta^(-2i/D_g).

Official Wan does this with complex float64 tensors. Here the angles are computed in float64 once per call (cheap:
one row per token) and only their cos/sin are kept, in float32; the rotation itself is fp32 real arithmetic, which
also works on devices without complex/fp64 kernels.
"""

from __future__ import annotations

import torch

__all__ = ["rope_split", "rope_cos_sin", "apply_rope"]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channel counts (frame, height, width) of one head: (d - 4·(d//6), 2·(d//6), 2·(d//6))."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE needs an even head_dim >= 6, got head_dim={head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """[n] integer positions -> [n, dim/2] float64 angles pos · theta^(-2i/dim)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    return positions.to(torch.float64)[:, None] * theta ** (-exponent)[None, :]


def rope_cos_sin(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    frame_offset: int = 0,
    theta: float = 10000.0,
    max_positions: int = 1024,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [F·H·W, head_dim/2] (float32) for a post-patch token grid (F, H, W).

    Tokens are ordered row-major over (f, h, w); frame positions start at `frame_offset` (absolute frame index of
    the first frame, used by causal KV-cache stepping), height and width positions at 0.
    """
    frames, height, width = grid
    last = max(frame_offset + frames, height, width) - 1
    if frame_offset < 0 or last >= max_positions:
        raise ValueError(
            f"RoPE position out of range: frames [{frame_offset}, {frame_offset + frames}), height {height}, "
            f"width {width} must all lie in [0, {max_positions}) (rope_max_positions)"
        )
    t_dim, h_dim, w_dim = rope_split(head_dim)
    arange = lambda n, start=0: torch.arange(start, start + n, device=device)  # noqa: E731
    ang_f = _axis_angles(arange(frames, frame_offset), t_dim, theta)  # [F, t/2]
    ang_h = _axis_angles(arange(height), h_dim, theta)  # [H, h/2]
    ang_w = _axis_angles(arange(width), w_dim, theta)  # [W, w/2]
    angles = torch.cat(
        [
            ang_f[:, None, None, :].expand(frames, height, width, -1),
            ang_h[None, :, None, :].expand(frames, height, width, -1),
            ang_w[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(frames * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, heads, head_dim] by per-token tables [L, head_dim/2].

    Computed in float32; returns float32 (the caller casts to the attention dtype, as official Wan does).
    """
    b, length, heads, dim = x.shape
    if cos.shape != (length, dim // 2):
        raise ValueError(f"RoPE table shape {tuple(cos.shape)} does not match tokens/head_dim ({length}, {dim // 2})")
    pairs = x.float().reshape(b, length, heads, dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).reshape(b, length, heads, dim)
