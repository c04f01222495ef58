"""FSDP2 sharding through Lightning's ModelParallelStrategy on 2 CPU processes (gloo).

The regression the design asks for: a sharded run follows the unsharded ground truth. Per-sample noise streams
(sfplus.noise) make 2 ranks × batch B the same computation as 1 process × batch 2B, so in fp32 weights must agree
to float-reduction precision; and a sharded checkpoint resumes to the weights of an uninterrupted sharded run.

In bf16 (FSDP2 gathering bf16 weights under bf16-mixed, as every shipped Wan config trains) the two runs round
differently, and AdamW's normalised steps turn rounding into visible weight differences within a few updates: the
sharded bf16 run must stay as close to the fp32 ground truth as the unsharded bf16 run does (measured: 5-30 % of
the distance the weights moved, for both), far from what a real fault gives (a net initialised or fed differently:
~100 %).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "dist" / "sharded_worker.py"


def run(out: Path, steps: int, batch: int, nproc: int, ckpt_in: str = "-", ckpt_out: str | None = None,
        variant: str = "dmd", dtype: str = "fp32", sp: int = 1) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(WORKER), str(out), str(steps), str(batch), ckpt_in]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), str(steps), str(batch), ckpt_in]
    if ckpt_out:
        cmd.append(ckpt_out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "SFPLUS_TEST_VARIANT": variant,
           "SFPLUS_TEST_PARAM_DTYPE": dtype, "SFPLUS_TEST_SP": str(sp)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=True)


NETS = ("generator", "generator_ema", "critic", "disc_head")


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a["counters"] == b["counters"]
    assert a.keys() == b.keys()
    for name in [n for n in NETS if n in a]:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], atol=atol, rtol=1e-4, msg=f"{name}.{k}")


def distance(a: dict, b: dict) -> float:
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dmd", "causal-dmd-gan"])
def test_sharded_fp32_run_matches_unsharded(tmp_path, variant):
    single = run(tmp_path / "single.pt", steps=6, batch=4, nproc=1, variant=variant)
    sharded = run(tmp_path / "sharded.pt", steps=6, batch=2, nproc=2, variant=variant)
    assert_close(single, sharded, atol=1e-5)
    start = run(tmp_path / "start.pt", steps=0, batch=4, nproc=1, variant=variant)
    for name in [n for n in NETS if n in single]:  # every net moved: not two untouched copies of the teacher
        assert distance(single[name], start[name]) > 1e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dmd", "causal-sid", "causal-dmd-gan"])
def test_sharded_bf16_run_follows_unsharded_and_resumes_exactly(tmp_path, variant):
    """The shipped Wan settings (bf16 FSDP2, bf16-mixed, activation checkpointing) on 2 ranks: DMD and SiD,
    bidirectional and causal, with the GAN head; the first critic update after a generator update used to crash."""
    kw = {"variant": variant, "dtype": "bf16"}
    truth = run(tmp_path / "truth.pt", steps=6, batch=4, nproc=1, variant=variant)  # unsharded fp32
    single = run(tmp_path / "single.pt", steps=6, batch=4, nproc=1, **kw)
    sharded = run(tmp_path / "sharded.pt", steps=6, batch=2, nproc=2, **kw)
    start = run(tmp_path / "start.pt", steps=0, batch=4, nproc=1, **kw)
    assert single["counters"] == sharded["counters"] == truth["counters"]
    for name in [n for n in NETS if n in single]:
        moved = distance(truth[name], start[name])
        assert moved > 1e-3, name
        # Sharded bf16 is no further from the fp32 ground truth than unsharded bf16 is (measured: 0.9-1.1x) ...
        assert distance(sharded[name], truth[name]) < 1.5 * distance(single[name], truth[name]), name
        # ... and both are far closer to it than a run that went wrong.
        assert distance(sharded[name], single[name]) < 0.5 * moved, name
    first = run(tmp_path / "first.pt", steps=3, batch=2, nproc=2, ckpt_out=str(tmp_path / "ckpt"), **kw)
    assert (tmp_path / "ckpt").is_dir(), "ModelParallelStrategy writes a sharded checkpoint directory"
    assert distance(first["generator"], sharded["generator"]) > 0
    resumed = run(tmp_path / "resumed.pt", steps=6, batch=2, nproc=2, ckpt_in=str(tmp_path / "ckpt"), **kw)
    assert_close(sharded, resumed, atol=0)
