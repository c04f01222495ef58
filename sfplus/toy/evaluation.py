"""``sfplus toy-eval``: score a toy teacher and its distilled student on the toy metrics.

Four rows, all from the same starting noise per (prompt, sample):

* teacher at its full step count with CFG (the quality target);
* teacher at the student's step count with CFG (what few steps give without distillation);
* the student (raw generator) and its EMA, at their few steps.

Prints a table and writes it as JSON (atomically) next to the outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI

from sfplus.cli_errors import OutputFolderError, folder_problem
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.file_checks import torch_load_mapping
from sfplus.modules import sample_seed, stable_seed
from sfplus.nets.presets import build_dit
from sfplus.sampling.samplers import few_step_sample, teacher_sample
from sfplus.sampling.streaming import causal_sample
from sfplus.toy.metrics import toy_metrics
from sfplus.toy.videos import ToyVideoSpec, make_toy_batch, toy_prompts
from sfplus.video_io import write_json_atomic
from sfplus.weights.checkpoints import CheckpointError, read_dit_state_dict
from sfplus.weights.lora_files import adapter_to_lora, merge_lora

METRIC_KEYS = ("prompt_accuracy", "colour_accuracy", "direction_accuracy", "sharpness", "frechet_distance")


def _checkpoint_info(path: str) -> dict[str, Any]:
    """The ``sfplus`` entry (net preset, latent shape, sampler) of a Lightning checkpoint, or of the JSON sidecar of
    a ``.safetensors`` teacher (``assets/toy_teacher/toy_teacher.json`` beside the shipped toy teacher)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        sidecar = p.with_suffix(".json")
        if not sidecar.is_file():
            raise CheckpointError(f"{p} needs its sidecar {sidecar} (net preset, latent shape and sampler), as "
                                  "assets/toy_teacher/toy_teacher.json")
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8")).get("sfplus")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{sidecar} is not valid JSON: {err}") from None
        if not isinstance(info, dict):
            raise CheckpointError(f"{sidecar} has no 'sfplus' entry")
        return info
    ckpt = torch_load_mapping(p, "checkpoint", CheckpointError)  # one-line errors for damaged files
    info = ckpt.get("sfplus")
    if not isinstance(info, dict) or "net" not in info:
        raise CheckpointError(f"checkpoint {p} is not an sfplus Lightning checkpoint (no 'sfplus' entry)")
    return info


def _net(path: str, which: str, info: dict) -> torch.nn.Module:
    net = build_dit(info["net"], **info.get("net_overrides", {}))
    sd = read_dit_state_dict(path, which=which)
    lora = info.get("lora")
    if lora:  # a LoRA distillation's checkpoint holds adapters: score them merged into the base they trained on
        sd = merge_lora(read_dit_state_dict(lora["base"]), adapter_to_lora(sd, lora["scale"]), f"LoRA of {path}")
    net.load_state_dict(sd, strict=True)
    return net.eval()


def _generate(fn, prompts: list[str], seeds: list[int], shape: list[int], cond_fn, batch_size: int,
              report=None) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        if report is not None:
            report(i)
        chunk = prompts[i : i + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                             for s in seeds[i : i + batch_size]])
        cond, uncond = cond_fn(chunk)
        g = torch.Generator().manual_seed(stable_seed("toy-eval", seeds[i]))
        out.append(fn(noise, cond, uncond, g).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()  # not torch.set_grad_enabled(False): that would outlive the call (tests, notebooks)
def evaluate(
    teacher: str,
    student: str | None = None,
    out: str = "runs/toy-eval",
    samples_per_prompt: int = 8,
    teacher_steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    batch_size: int = 64,
    seed: int = 1234,
    frames: int = 4,
    height: int = 16,
    width: int = 16,
    progress_every_s: float = 5.0,
) -> dict[str, dict[str, float]]:
    """Score the teacher (full and few steps) and, if given, the student (raw and EMA); returns the table.

    The clips (frames, size) and the toy codec come from the teacher checkpoint's latent shape; ``frames``,
    ``height`` and ``width`` are used only for a checkpoint without one. The teacher is a Lightning checkpoint or a
    ``.safetensors`` file with its JSON sidecar (the shipped ``assets/toy_teacher/toy_teacher.safetensors``).
    A progress line is printed after each row and at most every ``progress_every_s`` seconds within one (negative:
    none).
    """
    t_info = _checkpoint_info(teacher)
    # Both checkpoints and the output folder are checked before minutes of sampling, not after.
    s_info = _checkpoint_info(student) if student is not None else None
    problem = folder_problem(out)
    if problem is not None:
        raise OutputFolderError(problem)
    t_sampler = t_info.get("sampler", {})
    teacher_steps = teacher_steps or int(t_sampler.get("steps", 40))
    guidance_scale = guidance_scale if guidance_scale is not None else float(t_sampler.get("guidance_scale", 3.0))
    shift = shift if shift is not None else float(t_sampler.get("shift", 3.0))
    shape = list(t_info.get("video_shape", [3, frames, height, width]))
    # the toy codec from the latent layout: 3·s channels = s frames per latent frame (TimePackCodec)
    per_latent = max(1, shape[0] // 3)
    conditioner = ToyConditioner(frames_per_latent=per_latent)
    # the clips the teacher was trained on, from its latent shape (frames/height/width only without one)
    spec = ToyVideoSpec(frames=shape[1] * per_latent, height=shape[2], width=shape[3])

    def cond_fn(chunk):
        return conditioner.text(chunk), conditioner.negative(len(chunk))

    prompts = [p for p in toy_prompts(spec) for _ in range(samples_per_prompt)]
    seeds = [sample_seed(seed, i // samples_per_prompt, i % samples_per_prompt) for i in range(len(prompts))]
    reference, _ = make_toy_batch(len(prompts), seed=seed + 1, spec=spec)

    rows: dict[str, dict[str, float]] = {}
    teacher_net = _net(teacher, "ema", t_info)
    last_line = [time.perf_counter()]

    def add_row(name: str, fn) -> None:
        start = time.perf_counter()

        def report(done: int) -> None:  # a line every few seconds, with this row's ETA
            now = time.perf_counter()
            if done and progress_every_s >= 0 and now - last_line[0] >= progress_every_s:
                last_line[0] = now
                eta = (now - start) / done * (len(prompts) - done)
                print(f"toy-eval: {name}: {done}/{len(prompts)} videos, ETA {eta:.0f} s", flush=True)

        videos = conditioner.decode(_generate(fn, prompts, seeds, shape, cond_fn, batch_size, report))
        metrics = toy_metrics(videos, prompts, reference, spec)
        metrics["seconds"] = time.perf_counter() - start
        rows[name] = metrics
        if progress_every_s >= 0:
            last_line[0] = time.perf_counter()
            print(f"toy-eval: {name}: {len(prompts)} videos in {metrics['seconds']:.1f} s", flush=True)

    add_row(f"teacher {teacher_steps} steps + CFG", lambda n, c, u, g: teacher_sample(
        teacher_net, n, c, u, num_steps=teacher_steps, shift=shift, guidance_scale=guidance_scale))
    few = 4
    if student is not None:
        steps = s_info.get("sampler", {}).get("timesteps", [1000.0, 937.5, 833.33, 625.0])
        few = len(steps)
        add_row(f"teacher {few} steps + CFG", lambda n, c, u, g: teacher_sample(
            teacher_net, n, c, u, num_steps=few, shift=shift, guidance_scale=guidance_scale))
        sampler = s_info.get("sampler", {})

        def student_sampler(net):
            if sampler.get("kind") == "causal-few-step":  # a causal (Self-Forcing) student streams block by block

                return lambda n, c, u, g: causal_sample(
                    net, n, steps, c, frames_per_block=sampler["frames_per_block"], generator=g,
                    independent_first_frame=sampler.get("independent_first_frame", False))
            return lambda n, c, u, g: few_step_sample(net, n, steps, c, g)

        kind = "causal student" if sampler.get("kind") == "causal-few-step" else "student"
        add_row(f"{kind} {few} steps", student_sampler(_net(student, "model", s_info)))
        if s_info.get("counters", {}).get("ema_started"):
            add_row(f"{kind} EMA {few} steps", student_sampler(_net(student, "ema", s_info)))
    else:
        add_row(f"teacher {few} steps + CFG", lambda n, c, u, g: teacher_sample(
            teacher_net, n, c, u, num_steps=few, shift=shift, guidance_scale=guidance_scale))

    out_dir = Path(out)
    result = {"rows": rows, "videos_per_row": len(prompts), "teacher": teacher, "student": student}
    write_json_atomic(out_dir / "toy_metrics.json", result)
    print(format_table(rows))
    print(f"toy metrics written to {out_dir / 'toy_metrics.json'}")
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    head = ["model", "prompt acc", "colour acc", "direction acc", "sharpness", "FD (lower better)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        vals = [f"{m[k]:.3f}" if k != "frechet_distance" else f"{m[k]:.2f}" for k in METRIC_KEYS]
        lines.append("| " + " | ".join([name, *vals]) + " |")
    return "\n".join(lines)


def main(argv: list[str], exit_on_error: bool = True) -> None:
    CLI(evaluate, args=argv, as_positional=False, exit_on_error=exit_on_error)
