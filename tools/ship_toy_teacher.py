"""Write the shipped toy teacher (``assets/toy_teacher/``) from a trained toy-teacher checkpoint.

    OMP_NUM_THREADS=1 sfplus fit --config configs/toy/teacher.yaml          # ~8-12 min on 2 CPU cores
    python tools/ship_toy_teacher.py --train-seconds 760                     # export, score, write the sidecar

Writes, replacing what is there:

* ``toy_teacher.safetensors``: the teacher's EMA weights, fp32, Wan-original key names (``sfplus export``);
* ``toy_teacher.json``: what ``sfplus toy-eval`` and the DMD config need to use it (the ``sfplus`` entry: net preset
  and overrides, latent shape, sampler), how it was made (commands, sfplus commit, machine) and what it scored: the
  toy-metrics table of its 40-step and 4-step samples (``toy_metrics``, 128 videos a row, what ``make demo``
  compares the student with) and the small evaluation that ``tests/test_toy_teacher_asset.py`` repeats in CI
  (``ci_check``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from sfplus.toy.evaluation import evaluate
from sfplus.video_io import write_json_atomic
from sfplus.weights.export import export_generator

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "toy_teacher"
NAME = "toy_teacher"
# The small evaluation CI repeats: 2 videos per toy prompt (32 a row), the teacher's 40- and 4-step rows.
CI_SAMPLES_PER_PROMPT = 2


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/toy-teacher/checkpoints/last.ckpt", help="the trained teacher")
    parser.add_argument("--out", default=str(OUT), help="folder to write (default: assets/toy_teacher)")
    parser.add_argument("--train-command", default="OMP_NUM_THREADS=1 sfplus fit --config configs/toy/teacher.yaml")
    parser.add_argument("--train-seconds", type=float, default=None, help="how long the training took, to record")
    parser.add_argument("--trained-at", default=None, help="sfplus commit the teacher was trained at (default: HEAD)")
    args = parser.parse_args()

    out = Path(args.out)
    weights, sidecar = out / f"{NAME}.safetensors", out / f"{NAME}.json"
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    info = ckpt["sfplus"]
    export_generator(args.ckpt, str(weights), which="ema", dtype="fp32", overwrite=True)
    head = git("rev-parse", "HEAD")
    record = {
        "about": "The toy teacher that `make demo` distils: a WanDiT of preset `toy` (0.32 M parameters) trained "
                 "with flow matching on the built-in toy clips by sfplus itself (configs/toy/teacher.yaml). "
                 "Weights: the EMA, fp32, Wan-original key names.",
        "sfplus": {k: info[k] for k in ("class", "net", "net_overrides", "video_shape", "sampler") if k in info},
        "made_with": {
            "trained_at_commit": args.trained_at or head,
            "shipped_at_commit": head,
            "uncommitted_changes_when_shipped": bool(git("status", "--porcelain", "--untracked-files=no")),
            "commands": [args.train_command,
                         f"python tools/ship_toy_teacher.py --ckpt {args.ckpt}"
                         + (f" --train-seconds {args.train_seconds:.0f}" if args.train_seconds else "")],
            "updates": int(ckpt.get("global_step", 0)),
            "counters": info.get("counters", {}),
            "train_seconds": args.train_seconds,
            "date": dt.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"python {platform.python_version()}",
        },
    }
    write_json_atomic(sidecar, record)  # toy-eval reads the `sfplus` entry from here
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB); scoring it (128 videos a row)", flush=True)
    full = evaluate(str(weights), out=str(ROOT / "runs" / "toy-teacher-eval"))
    print(f"the small evaluation CI repeats ({CI_SAMPLES_PER_PROMPT} videos per prompt)", flush=True)
    small = evaluate(str(weights), out=str(ROOT / "runs" / "toy-teacher-eval-ci"),
                     samples_per_prompt=CI_SAMPLES_PER_PROMPT)
    keys = ("prompt_accuracy", "colour_accuracy", "direction_accuracy", "sharpness", "frechet_distance")
    videos = {name: json.loads((ROOT / "runs" / name / "toy_metrics.json").read_text())["videos_per_row"]
              for name in ("toy-teacher-eval", "toy-teacher-eval-ci")}
    record["toy_metrics"] = {"videos_per_row": videos["toy-teacher-eval"],
                             "command": f"sfplus toy-eval --teacher {weights.relative_to(ROOT)}",
                             "rows": {name: {k: round(float(row[k]), 4) for k in keys} for name, row in full.items()}}
    record["ci_check"] = {"samples_per_prompt": CI_SAMPLES_PER_PROMPT, "videos_per_row": videos["toy-teacher-eval-ci"],
                          "rows": {name: {k: float(row[k]) for k in keys} for name, row in small.items()}}
    write_json_atomic(sidecar, record)
    print(f"wrote {sidecar}")


if __name__ == "__main__":
    sys.exit(main())
