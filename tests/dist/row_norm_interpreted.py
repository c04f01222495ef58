"""Run by tests/nets/test_row_norm_interpreter.py in its own process: Triton must see TRITON_INTERPRET=1 before
it is imported (its language functions are built at import), and other tests in the pytest process may need the
compiled kernel.

    TRITON_INTERPRET=1 python tests/dist/row_norm_interpreted.py

Checks the VAE's fused norm kernel on CPU tensors against the formula (inside a view of a bigger buffer), then
the fused decode end to end against the plain one. Exits non-zero with the failing case on any mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"

from sfplus.nets import row_norm  # noqa: E402
from sfplus.nets.vae import StreamingDecoder, WanVAE  # noqa: E402


def check_kernel() -> None:
    cl = torch.channels_last_3d
    for channels in (12, 96, 384):
        for dtype in (torch.float32, torch.bfloat16):
            for silu in (True, False):
                g = torch.Generator().manual_seed(channels)
                x = torch.randn(2, channels, 5, 6, 7, generator=g).to(dtype).contiguous(memory_format=cl)
                x[0, :, 0, 0, 0] = 0  # an all-zero row: F.normalize's max(norm, 1e-12)
                gamma = torch.rand(channels, 1, 1, 1, generator=g) + 0.5
                joined = torch.full((2, channels, 7, 6, 7), 7.0, dtype=dtype).contiguous(memory_format=cl)
                row_norm.rms_norm_silu_into(x, gamma, joined[:, :, 2:], silu=silu)
                expected = F.normalize(x.float(), dim=1) * channels**0.5 * gamma
                if silu:
                    expected = F.silu(expected)
                tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
                case = f"channels {channels}, {dtype}, silu {silu}"
                torch.testing.assert_close(joined[:, :, 2:].float(), expected.to(dtype).float(), msg=case, **tol)
                assert torch.all(joined[:, :, :2] == 7.0), f"{case}: the kernel wrote outside its view"


def check_decode() -> None:
    calls = []
    kernel = row_norm.rms_norm_silu_into
    row_norm.rms_norm_silu_into = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    row_norm.available = lambda x: not (torch.is_grad_enabled() and x.requires_grad)  # CPU tensors, interpreted
    torch.manual_seed(0)
    vae = WanVAE(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1).eval().use_channels_last()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):  # norms start at 1: make a mixed-up gamma show
                p.copy_(torch.rand(p.shape) + 0.5)
        z = torch.randn(1, 16, 6, 4, 6)
        fused = StreamingDecoder(vae.use_fused_norms()).decode(z)
        assert calls, "the fused path did not run"
        plain = StreamingDecoder(vae.use_fused_norms(False)).decode(z)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    print(f"fused decode: {len(calls)} kernel calls, max |fused - plain| {(fused - plain).abs().max():.2e}")


if __name__ == "__main__":
    check_kernel()
    check_decode()
    sys.exit(0)
