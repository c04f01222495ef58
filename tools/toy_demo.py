"""The main job on the built-in toy task, end to end (what ``make demo`` runs).

1. trains the toy teacher (``configs/toy/teacher.yaml``);
2. distils it into a 4-step generator with DMD (``configs/toy/dmd.yaml``);
3. generates MP4s for the toy prompts with the student (``sfplus predict``);
4. prints the toy-metrics table (teacher full steps, teacher 4 steps, student, student EMA) and writes it as JSON.

Each stage is the ``sfplus`` command a user would type; this script only chains them and times them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
SFPLUS = [sys.executable, "-m", "sfplus"]


def stage(title: str, args: list[str]) -> float:
    print(f"\n=== {title}\n$ sfplus {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([*SFPLUS, *args], cwd=ROOT, check=True)
    took = time.perf_counter() - start
    print(f"--- {title}: {took:.0f} s", flush=True)
    return took


def main() -> None:
    for name in ("toy-teacher", "toy-dmd", "toy-eval"):
        shutil.rmtree(RUNS / name, ignore_errors=True)
    start = time.perf_counter()
    times = {
        "teacher": stage("1/4 train the toy teacher", ["fit", "--config", "configs/toy/teacher.yaml"]),
        "dmd": stage("2/4 distil it with DMD", ["fit", "--config", "configs/toy/dmd.yaml"]),
        "predict": stage("3/4 generate MP4s with the student", [
            "predict", "--config", "configs/toy/dmd.yaml", "--ckpt_path", "runs/toy-dmd/checkpoints/last.ckpt"]),
        "eval": stage("4/4 toy metrics", [
            "toy-eval", "--teacher", "runs/toy-teacher/checkpoints/last.ckpt",
            "--student", "runs/toy-dmd/checkpoints/last.ckpt", "--out", "runs/toy-eval"]),
    }
    total = time.perf_counter() - start
    print(f"\nDone in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}).")
    print(f"  TensorBoard logs: tensorboard --logdir {RUNS}")
    print(f"  checkpoints:      {RUNS}/toy-teacher/checkpoints, {RUNS}/toy-dmd/checkpoints")
    print(f"  student MP4s:     {RUNS}/toy-dmd/videos")
    print(f"  toy metrics:      {RUNS}/toy-eval/toy_metrics.json")


if __name__ == "__main__":
    main()
