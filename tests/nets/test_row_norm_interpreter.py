"""The VAE's fused Triton norm kernel, run on the CPU by Triton's interpreter where Triton is installed.

CI has no Triton (a 1 GB package for one kernel), so this skips there; on a machine with Triton (any CUDA build of
torch) it checks the kernel itself — not the PyTorch twin the other CPU tests use — against the formula, and the
fused decode end to end against the plain one. The GPU-marked tests in test_vae.py run the compiled kernel.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "dist" / "row_norm_interpreted.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_norm_kernel_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    root = str(SCRIPT.parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "fused decode:" in proc.stdout
