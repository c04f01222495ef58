"""Ulysses sequence parallelism (sfplus.nets.sequence_parallel): 2 gloo ranks splitting every frame's tokens give
the forward outputs and gradients of one process running the whole sequence, in fp32, for every WanDiT call mode;
and group sizes that cannot split the heads or the tokens are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfplus.nets.presets import build_dit
from sfplus.nets.sequence_parallel import SequenceShard, SPGroup, check_heads, enable_sequence_parallel

WORKER = Path(__file__).parents[1] / "dist" / "sp_worker.py"


def test_two_ranks_match_one_process_in_every_call_mode(tmp_path):
    out = tmp_path / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    assert set(results) == {"full", "block_causal", "teacher_forcing", "kv_cache"}
    for mode, r in results.items():
        # Outputs and gradients are not trivially zero (a dead net would match anything) ...
        assert r["out_norm"] > 0.1 and r["grad_norm"] > 1.0, (mode, r)
        # ... and agree to fp32 rounding (measured: outputs <= 4e-7, gradients <= 6e-6 of norms 11-26).
        assert r["out"] <= 1e-5 * r["out_norm"], (mode, r)
        assert r["grad"] <= 2e-6 * r["grad_norm"], (mode, r)


def test_head_count_that_does_not_divide_is_refused():
    net = build_dit("tiny", in_dim=3, out_dim=3)  # 2 heads
    with pytest.raises(ValueError, match=r"sequence_parallel=4 must divide the model's num_heads=2"):
        enable_sequence_parallel(net, SPGroup(group=None, size=4, rank=0))
    with pytest.raises(ValueError, match=r"sequence_parallel=4 must divide the model's num_heads=6"):
        check_heads(6, 4)
    check_heads(40, 8)  # Wan 14B: 40 heads over 8 ranks


def test_tokens_per_frame_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match=r"tokens per frame \(H'·W' = 6\) divisible by 4"):
        SequenceShard(SPGroup(group=None, size=4, rank=0), 6)
    shard = SequenceShard(SPGroup(group=None, size=2, rank=1), 6)
    assert shard.local_tokens_per_frame == 3


def test_sp_of_one_is_off():
    net = enable_sequence_parallel(build_dit("tiny", in_dim=3, out_dim=3), SPGroup(group=None, size=1, rank=0))
    assert net.sequence_parallel is None
    x = torch.randn(1, 3, 2, 4, 4)
    assert net(x, torch.tensor([500.0]), torch.randn(1, 3, 16)).shape == x.shape
