"""Batch generation on 2 CPU processes writes exactly the videos of a 1-process run: every prompt once, the
same latents (seeds depend only on base seed, prompt index and sample index), with an uneven prompt count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sfplus.cli import main


def config(tmp_path: Path, out: str) -> Path:
    cfg = {
        "seed_everything": 0,  # the same random (untrained) nets in every process
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / f"{out}-run"),
                    "enable_model_summary": False, "enable_checkpointing": False,
                    "callbacks": [{"class_path": "sfplus.callbacks.VideoWriter",
                                   "init_args": {"output_dir": str(tmp_path / out), "save_latents": True}}]},
        "model": {"class_path": "sfplus.modules.DistillModule",
                  "init_args": {"net": "tiny", "net_overrides": {"in_dim": 3, "out_dim": 3},
                                "conditioner": {"class_path": "sfplus.conditioning.ToyConditioner",
                                                "init_args": {"text_dim": 16, "text_len": 8}},
                                "video_shape": [3, 2, 4, 4], "predict_seed": 11}},
        "data": {"class_path": "sfplus.datamodules.PromptDataModule",
                 "init_args": {"path": str(tmp_path / "prompts.txt"), "batch_size": 2, "num_samples": 2}},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_processes_write_the_same_videos_as_one(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(5)))  # 10 videos, uneven
    main(["predict", "--config", str(config(tmp_path, "one"))])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sfplus",
           "predict", "--config", str(config(tmp_path, "two")), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    one = sorted(p.name for p in (tmp_path / "one").glob("*.pt"))
    two = sorted(p.name for p in (tmp_path / "two").glob("*.pt"))
    assert len(one) == 10 and one == two
    for name in one:
        a = torch.load(tmp_path / "one" / name, weights_only=True)
        b = torch.load(tmp_path / "two" / name, weights_only=True)
        torch.testing.assert_close(a, b, msg=name)
