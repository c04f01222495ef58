"""`sfplus predict` with sequence parallelism (#20): a (1 x 2) mesh whose two ranks split every video's tokens
writes the videos of a 1-process run, once each, for the few-step bidirectional sampler and for causal streaming
(KV-cache blocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sfplus.cli import main
from tests.helpers import write_tiny_teacher

MESH = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 2}}


def config(tmp_path: Path, out: str, teacher: str, causal: bool, sp: int) -> Path:
    recipe = {"causal": {"frames_per_block": 1}} if causal else {}
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": sp, "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / f"{out}-run"), "enable_model_summary": False,
                    "enable_checkpointing": False, **({"strategy": MESH} if sp > 1 else {}),
                    "callbacks": [{"class_path": "sfplus.callbacks.VideoWriter",
                                   "init_args": {"output_dir": str(tmp_path / out), "save_latents": True}}]},
        "model": {"class_path": "sfplus.modules.DistillModule",
                  "init_args": {"net": "tiny", "net_overrides": {"in_dim": 3, "out_dim": 3},
                                "teacher_checkpoint": teacher,
                                "scale": {"sequence_parallel": sp, "param_dtype": "fp32"},
                                "conditioner": {"class_path": "sfplus.conditioning.ToyConditioner",
                                                "init_args": {"text_dim": 16, "text_len": 8}},
                                "video_shape": [3, 3, 4, 4], "predict_seed": 11, **recipe}},
        "data": {"class_path": "sfplus.datamodules.PromptDataModule",
                 "init_args": {"path": str(tmp_path / "prompts.txt"), "batch_size": 2}},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["few-step", "causal-streaming"])
def test_sequence_parallel_predict_writes_the_videos_of_one_process(tmp_path, causal):
    (tmp_path / "prompts.txt").write_text("\n".join(f"a red square moving {d}" for d in ("left", "up", "down")))
    teacher = write_tiny_teacher(tmp_path / "teacher.safetensors")
    main(["predict", "--config", str(config(tmp_path, "one", teacher, causal, sp=1))])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sfplus",
           "predict", "--config", str(config(tmp_path, "sp", teacher, causal, sp=2))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    one = sorted(p.name for p in (tmp_path / "one").glob("*.pt"))
    two = sorted(p.name for p in (tmp_path / "sp").glob("*.pt"))
    assert len(one) == 3 and one == two
    assert "wrote 0 videos" in proc.stdout + proc.stderr  # the group's second rank generates but does not write
    for name in one:
        a = torch.load(tmp_path / "one" / name, weights_only=True)
        b = torch.load(tmp_path / "sp" / name, weights_only=True)
        assert a.abs().max() > 0.1
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
