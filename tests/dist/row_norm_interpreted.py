"""Run by tests/nets/test_row_norm_interpreter.py in its own process: Triton must see TRITON_INTERPRET=1 before
it is imported (its language functions are built at import), and other tests in the pytest process may need the
compiled kernel.

    TRITON_INTERPRET=1 python tests/dist/row_norm_interpreted.py

The GPU tests' checks (tests/row_norm_checks.py) on CPU tensors: the kernel against the formula inside a view of a
bigger buffer, then the fused decode end to end against the plain one. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"

from sfplus.nets import row_norm  # noqa: E402
from tests.row_norm_checks import check_kernel_into_view, fused_and_plain_decode  # noqa: E402

if __name__ == "__main__":
    for channels in (12, 96, 384):
        for dtype in (torch.float32, torch.bfloat16):
            for silu in (True, False):
                check_kernel_into_view("cpu", channels, dtype, silu)
    calls = []
    kernel = row_norm.rms_norm_silu_into
    row_norm.rms_norm_silu_into = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    row_norm.available = lambda x: not (torch.is_grad_enabled() and x.requires_grad)  # CPU tensors, interpreted
    fused, plain = fused_and_plain_decode("cpu")
    assert calls, "the fused path did not run"
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    print(f"fused decode: {len(calls)} kernel calls, max |fused - plain| {(fused - plain).abs().max():.2e}")
