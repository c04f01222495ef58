"""Write the shipped toy teacher (``assets/toy_teacher/``) from a trained toy-teacher checkpoint.

    OMP_NUM_THREADS=1 sfplus fit --config configs/toy/teacher.yaml          # ~8-12 min on 2 CPU cores
    python tools/ship_toy_teacher.py --train-seconds 760                     # export, score, write the sidecar

``--stream`` writes the streaming toy teacher (``assets/toy_teacher_stream/``, what ``make demo-causal`` distils)
instead: the shipped teacher fine-tuned on 8-frame clips, two packed latent frames
(``configs/toy/teacher_stream.yaml``):

    OMP_NUM_THREADS=1 sfplus fit --config configs/toy/teacher_stream.yaml   # ~4 min on 2 CPU cores
    python tools/ship_toy_teacher.py --stream --train-seconds 240

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
# name -> (training config, its checkpoint, what the sidecar says it is)
TEACHERS = {
    "toy_teacher": (
        "configs/toy/teacher.yaml", "runs/toy-teacher/checkpoints/last.ckpt",
        "The toy teacher that `make demo` distils: a WanDiT of preset `toy` (0.32 M parameters) trained with flow "
        "matching on the built-in toy clips by sfplus itself (configs/toy/teacher.yaml). Weights: the EMA, fp32, "
        "Wan-original key names."),
    "toy_teacher_stream": (
        "configs/toy/teacher_stream.yaml", "runs/toy-teacher-stream/checkpoints/last.ckpt",
        "The streaming toy teacher that `make demo-causal` distils into a causal (Self-Forcing) student: the shipped "
        "toy teacher (assets/toy_teacher) fine-tuned with flow matching on 8-frame toy clips, 2 packed latent frames "
        "of 4 frames (configs/toy/teacher_stream.yaml). Weights: the EMA, fp32, Wan-original key names."),
}
# The small evaluation CI repeats: videos per toy prompt (16 prompts), the teacher's 40- and 4-step rows. The
# streaming teacher's videos have twice the tokens, so it repeats 1 per prompt (16 a row) in about the same time.
CI_SAMPLES_PER_PROMPT = {"toy_teacher": 2, "toy_teacher_stream": 1}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true",
                        help="the streaming teacher (configs/toy/teacher_stream.yaml -> assets/toy_teacher_stream)")
    parser.add_argument("--ckpt", default=None, help="the trained teacher (default: the config's last.ckpt)")
    parser.add_argument("--out", default=None, help="folder to write (default: assets/<name>)")
    parser.add_argument("--train-command", default=None, help="how it was trained (default: sfplus fit of the config)")
    parser.add_argument("--train-seconds", type=float, default=None, help="how long the training took, to record")
    parser.add_argument("--trained-at", default=None, help="sfplus commit the teacher was trained at (default: HEAD)")
    args = parser.parse_args()

    name = "toy_teacher_stream" if args.stream else "toy_teacher"
    config, default_ckpt, about = TEACHERS[name]
    args.ckpt = args.ckpt or default_ckpt
    args.train_command = args.train_command or f"OMP_NUM_THREADS=1 sfplus fit --config {config}"
    out = Path(args.out) if args.out else ROOT / "assets" / name
    weights, sidecar = out / f"{name}.safetensors", out / f"{name}.json"
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    info = ckpt["sfplus"]
    export_generator(args.ckpt, str(weights), which="ema", dtype="fp32", overwrite=True)
    head = git("rev-parse", "HEAD")
    record = {
        "about": about,
        "sfplus": {k: info[k] for k in ("class", "net", "net_overrides", "video_shape", "sampler") if k in info},
        "made_with": {
            "trained_at_commit": args.trained_at or head,
            "shipped_at_commit": head,
            "uncommitted_changes_when_shipped": bool(git("status", "--porcelain", "--untracked-files=no")),
            "commands": [args.train_command,
                         f"python tools/ship_toy_teacher.py{' --stream' if args.stream else ''} --ckpt {args.ckpt}"
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
    runs = {"full": f"{name.replace('_', '-')}-eval", "ci": f"{name.replace('_', '-')}-eval-ci"}
    full = evaluate(str(weights), out=str(ROOT / "runs" / runs["full"]))
    ci_samples = CI_SAMPLES_PER_PROMPT[name]
    print(f"the small evaluation CI repeats ({ci_samples} videos per prompt)", flush=True)
    small = evaluate(str(weights), out=str(ROOT / "runs" / runs["ci"]), samples_per_prompt=ci_samples)
    keys = ("prompt_accuracy", "colour_accuracy", "direction_accuracy", "sharpness", "frechet_distance")
    videos = {k: json.loads((ROOT / "runs" / run / "toy_metrics.json").read_text())["videos_per_row"]
              for k, run in runs.items()}
    record["toy_metrics"] = {"videos_per_row": videos["full"],
                             "command": f"sfplus toy-eval --teacher {weights.relative_to(ROOT)}",
                             "rows": {row_name: {k: round(float(row[k]), 4) for k in keys}
                                      for row_name, row in full.items()}}
    record["ci_check"] = {"samples_per_prompt": ci_samples, "videos_per_row": videos["ci"],
                          "rows": {row_name: {k: float(row[k]) for k in keys} for row_name, row in small.items()}}
    write_json_atomic(sidecar, record)
    print(f"wrote {sidecar}")


if __name__ == "__main__":
    sys.exit(main())
