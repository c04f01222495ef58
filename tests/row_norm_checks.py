"""Checks of the VAE's fused norm kernel (`sfplus.nets.row_norm`), shared by the GPU tests in nets/test_vae.py
(compiled Triton on CUDA) and tests/dist/row_norm_interpreted.py (Triton's interpreter on CPU tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sfplus.nets.vae import StreamingDecoder, WanVAE


def torch_norm_silu_into(x, gamma, out, silu=True):
    """The fused kernel's contract in PyTorch: out <- SiLU(normalize(x) * sqrt(C) * gamma)."""
    y = F.normalize(x.float(), dim=1) * (gamma.float().reshape(1, -1, 1, 1, 1) * x.shape[1] ** 0.5)
    out.copy_(F.silu(y) if silu else y)
    return out


def check_kernel_into_view(device: str, channels: int, dtype: torch.dtype, silu: bool = True) -> None:
    """The kernel against the formula, batch 2, written into a view of a bigger buffer that it must not leave."""
    from sfplus.nets.row_norm import rms_norm_silu_into

    g = torch.Generator().manual_seed(channels)
    cl = torch.channels_last_3d
    x = torch.randn(2, channels, 5, 6, 7, generator=g).to(device, dtype).contiguous(memory_format=cl)
    x[0, :, 0, 0, 0] = 0  # an all-zero row: F.normalize's max(norm, 1e-12)
    gamma = (torch.rand(channels, 1, 1, 1, generator=g) + 0.5).to(device)
    joined = torch.full((2, channels, 7, 6, 7), 7.0, device=device, dtype=dtype).contiguous(memory_format=cl)
    rms_norm_silu_into(x, gamma, joined[:, :, 2:], silu=silu)
    expected = torch_norm_silu_into(x, gamma, torch.empty_like(x), silu=silu)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    case = f"channels {channels}, {dtype}, silu {silu}"
    torch.testing.assert_close(joined[:, :, 2:], expected, msg=case, **tol)
    assert torch.all(joined[:, :, :2] == 7.0), f"{case}: the kernel wrote outside its view"


def fused_and_plain_decode(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny channels-last WanVAE (norm gammas made to differ) decodes the same latents with and without the
    fused norms; returns (fused, plain)."""
    torch.manual_seed(0)
    vae = WanVAE(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):  # norms start at 1: make a mixed-up gamma show
                p.copy_(torch.rand(p.shape) + 0.5)
        vae = vae.to(device).use_channels_last()
        z = torch.randn(1, 16, 6, 4, 6).to(device)
        fused = StreamingDecoder(vae.use_fused_norms()).decode(z)
        plain = StreamingDecoder(vae.use_fused_norms(False)).decode(z)
    return fused, plain
