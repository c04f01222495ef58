"""The main job on the built-in toy task, end to end (what ``make demo`` runs).

``make demo`` starts, as a user would, from a teacher they downloaded: the toy teacher shipped in
``assets/toy_teacher/`` (trained by sfplus itself, see its README). It

1. distils the teacher into a 4-step generator with DMD (``configs/toy/dmd.yaml``);
2. generates MP4s for the toy prompts with the student (``sfplus predict``);
3. scores teacher and student on the toy metrics (``sfplus toy-eval``) and writes the table as JSON.

``make demo-full`` (``--train-teacher``) first trains the teacher from scratch (``configs/toy/teacher.yaml``,
about 8-12 more minutes on 2 CPU cores) and distils that one instead.

``make demo-causal`` (``--causal``) distils a causal student that streams, for ``make serve-demo-causal``: the
streaming toy teacher shipped in ``assets/toy_teacher_stream/`` (8-frame clips, two packed latent frames) into a
Self-Forcing 4-step generator of two causal blocks (``configs/toy/causal_dmd_stream.yaml``), then the same MP4s and
metrics. Its outputs go to ``runs/toy-causal-stream`` and ``runs/toy-eval-stream``; ``make demo``'s are untouched.

Each stage is the ``sfplus`` command a user would type, printed before it runs; this script only chains and times
them, and says at the end how to read the table and where the outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
SHIPPED_TEACHER = "assets/toy_teacher/toy_teacher.safetensors"
TRAINED_TEACHER = "runs/toy-teacher/checkpoints/last.ckpt"
STUDENT = "runs/toy-dmd/checkpoints/last.ckpt"
STREAM_TEACHER = "assets/toy_teacher_stream/toy_teacher_stream.safetensors"
STREAM_CONFIG = "configs/toy/causal_dmd_stream.yaml"
STREAM_STUDENT = "runs/toy-causal-stream/checkpoints/last.ckpt"


def stage(number: str, title: str, what: str, args: list[str], env: dict[str, str]) -> float:
    print(f"\n[{number}] {title}: {what}\n$ sfplus {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sfplus", *args], cwd=ROOT, check=True, env=env)
    took = time.perf_counter() - start
    print(f"[{number}] {title}: done in {took:.0f} s", flush=True)
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-teacher", action="store_true",
                        help="train the toy teacher first (configs/toy/teacher.yaml) and distil that one")
    parser.add_argument("--causal", action="store_true",
                        help="distil the shipped streaming teacher into a causal student (what serve-demo-causal "
                             "serves) instead")
    args = parser.parse_args(argv)
    if args.causal and args.train_teacher:
        parser.error("--causal distils the shipped streaming teacher; it does not take --train-teacher")

    # One intra-op thread per process: the toy nets are tiny, and two threads that wait on each other collapse when
    # another process wants the cores. Measured on 2 cores: DMD, 200 updates, nearly idle: 2 threads 14 s, 1 thread
    # 19-20 s, but 2 threads 183 s once another job started; the toy teacher at load ~6: 2 threads 1.4 updates/s,
    # 1 thread 10.6 updates/s. A value the user set is kept.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.causal:
        return causal_demo(env)
    for name in ("toy-teacher", "toy-dmd", "toy-eval") if args.train_teacher else ("toy-dmd", "toy-eval"):
        shutil.rmtree(RUNS / name, ignore_errors=True)

    teacher = TRAINED_TEACHER if args.train_teacher else SHIPPED_TEACHER
    n = 4 if args.train_teacher else 3
    print("sfplus toy demo: distil a video diffusion teacher (a tiny Wan2.1-architecture DiT, 40 sampling steps) "
          "into a 4-step generator with DMD, generate MP4s, and score both on the toy metrics.\n"
          + ("Teacher: trained here first (configs/toy/teacher.yaml). " if args.train_teacher else
             f"Teacher: the shipped one, {SHIPPED_TEACHER} (`make demo-full` retrains it). ")
          + ("About 13 minutes on 2 CPU cores." if args.train_teacher else "About 2-2.5 minutes on 2 CPU cores."),
          flush=True)
    start = time.perf_counter()
    times: dict[str, float] = {}
    i = 0
    if args.train_teacher:
        i += 1
        times["teacher"] = stage(f"{i}/{n}", "Train the teacher",
                                 "flow matching on the toy clips, 8000 updates (~8-12 min)",
                                 ["fit", "--config", "configs/toy/teacher.yaml"], env)
    i += 1
    dmd = ["fit", "--config", "configs/toy/dmd.yaml"]
    if args.train_teacher:
        dmd += ["--model.init_args.teacher_checkpoint", TRAINED_TEACHER]
    times["distil"] = stage(f"{i}/{n}", "Distil with DMD", "a 4-step student learns to match the teacher's "
                            "40-step samples, 900 updates (~2 min)", dmd, env)
    i += 1
    times["generate"] = stage(f"{i}/{n}", "Generate MP4s", "the student writes 2 videos per toy prompt (~10 s)", [
        "predict", "--config", "configs/toy/dmd.yaml", "--ckpt_path", STUDENT], env)
    i += 1
    times["score"] = stage(f"{i}/{n}", "Score", "toy metrics of teacher and student on the same starting noise "
                           "(~20-40 s)", ["toy-eval", "--teacher", teacher, "--student", STUDENT,
                                          "--out", "runs/toy-eval"], env)
    total = time.perf_counter() - start

    result = json.loads((RUNS / "toy-eval" / "toy_metrics.json").read_text())
    print(f"\nDone in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}).")
    print(f"How to read the table: each row scores {result['videos_per_row']} videos (every toy prompt, the same "
          "noises in every row); the 4-step student should be level with the teacher at 40 steps (prompt accuracy "
          "near 1, sharpness within ~0.03, FD within ~0.1, lower is better) and clearly better than the teacher at "
          "4 steps.")
    print(f"  student MP4s (+ a JSON each): {(RUNS / 'toy-dmd' / 'videos').relative_to(ROOT)}/")
    print(f"  TensorBoard logs:             tensorboard --logdir {RUNS.relative_to(ROOT)}   (losses, sample videos)")
    print(f"  metrics as JSON:              {(RUNS / 'toy-eval' / 'toy_metrics.json').relative_to(ROOT)}")


def causal_demo(env: dict[str, str]) -> None:
    """``make demo-causal``: distil the streaming teacher into a causal student, generate, score."""
    for name in ("toy-causal-stream", "toy-eval-stream"):
        shutil.rmtree(RUNS / name, ignore_errors=True)
    print("sfplus toy demo, causal: distil the shipped streaming toy teacher (8-frame clips = 2 packed latent frames, "
          f"{STREAM_TEACHER}) with Self-Forcing DMD into a causal 4-step generator that makes the video one block "
          "(4 frames) after the other, generate MP4s, and score both on the toy metrics. "
          "About 4-5 minutes on 2 CPU cores.", flush=True)
    start = time.perf_counter()
    times = {
        "distil": stage("1/3", "Distil with Self-Forcing DMD", "a causal 4-step student rolls out its own 2 blocks "
                        "and learns to match the teacher, 600 updates (~3 min)",
                        ["fit", "--config", STREAM_CONFIG], env),
        "generate": stage("2/3", "Generate MP4s", "the student writes 2 videos per toy prompt, block by block (~10 s)",
                          ["predict", "--config", STREAM_CONFIG, "--ckpt_path", STREAM_STUDENT], env),
        "score": stage("3/3", "Score", "toy metrics of teacher and student on the same starting noise (~40-60 s)",
                       ["toy-eval", "--teacher", STREAM_TEACHER, "--student", STREAM_STUDENT,
                        "--out", "runs/toy-eval-stream"], env),
    }
    total = time.perf_counter() - start
    result = json.loads((RUNS / "toy-eval-stream" / "toy_metrics.json").read_text())
    print(f"\nDone in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}).")
    print(f"How to read the table: each row scores {result['videos_per_row']} 8-frame videos (every toy prompt, the "
          "same noises in every row); the causal student is compared with its teacher at 40 and at 4 steps "
          "(docs/toy_results.md records what it scored when it was made).")
    print(f"  student MP4s (+ a JSON each): {(RUNS / 'toy-causal-stream' / 'videos').relative_to(ROOT)}/")
    print(f"  metrics as JSON:              {(RUNS / 'toy-eval-stream' / 'toy_metrics.json').relative_to(ROOT)}")
    print("  watch it stream:              make serve-demo-causal   (http://127.0.0.1:7860)")


if __name__ == "__main__":
    main()
