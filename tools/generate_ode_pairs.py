"""Generate teacher ODE trajectories (ODE pairs) for the ODE-regression initialisation, as latent shards.

    python tools/generate_ode_pairs.py --prompts prompts.txt --out shards/ode/ \\
        --teacher Wan2.1-T2V-1.3B/ --t5 Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \\
        --tokenizer Wan2.1-T2V-1.3B/google/umt5-xxl
    torchrun --nproc-per-node 8 tools/generate_ode_pairs.py ...      # prompts split across the 8 GPUs

For each prompt the teacher solves the flow ODE from Gaussian noise with ``--steps`` Euler steps of Wan's shifted
schedule (``--shift``) and CFG (``--guidance``, negative prompt = Wan's), keeping snapshots at the unshifted
``--keep`` steps; the reference recipe (48 steps, shift 8, guidance 6, keep 1000,750,500,250,0) gives snapshots
at t = [1000, 960, 888.9, 727.3, 0], which must match the ODE-init config's warped ``denoising_step_list``.

Each trajectory goes to ``<out>/samples/<index>.safetensors`` (atomic; existing ones are skipped, so a stopped job
just runs again); when every prompt is done, rank 0 packs ``<out>/shard-*.tar`` + ``index.json``. Under torchrun
the ranks meet at a barrier before packing; with explicit ``--rank/--world-size`` run ``--pack-only`` at the end.
Text-to-video teachers only. The noise of prompt i depends only on (--seed, i).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sfplus.conditioning.conditioner import Conditioner, ToyConditioner
from sfplus.datamodules.prompts import read_prompts
from sfplus.datamodules.shard_format import (
    INDEX_NAME,
    STORAGE_DTYPES,
    ShardFormatError,
    make_key,
    read_sample_file,
    shard_sizes,
    write_shards,
)
from sfplus.nets.codec import IdentityCodec
from sfplus.nets.presets import build_dit
from sfplus.nets.text import UMT5TextEncoder
from sfplus.ode_pairs import generate_ode_samples, sample_file, snapshot_timesteps
from sfplus.video_io import write_json_atomic
from sfplus.weights.wan_folders import detect_preset, load_folder_into

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)  # Wan2.1's default (shared_config.sample_neg_prompt), which the reference also uses here


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_teacher(path: str, preset: str | None, overrides: dict, device: torch.device, dtype: torch.dtype):
    """The frozen teacher DiT: built on the meta device, weights assigned from ``path`` (strict)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--teacher {path} does not exist")
    name = preset or detect_preset(path)
    with torch.device("meta"):
        net = build_dit(name, **overrides).to(dtype)
    load_folder_into(net, path, device=device)
    return net.eval().requires_grad_(False)


def build_conditioner(args, net, device: torch.device):
    if args.toy_text:
        cfg = net.config
        toy = ToyConditioner(text_dim=cfg.text_dim, text_len=cfg.text_len, negative_prompt=args.negative_prompt)
        return toy.to(device)
    if not args.t5 or not args.tokenizer:
        raise ValueError("--t5 and --tokenizer are required (or --toy-text for a toy teacher)")
    dtype = torch.float32 if args.t5_fp32 else torch.bfloat16
    encoder = UMT5TextEncoder.load(args.t5, args.tokenizer, dtype=dtype, device=device)
    # The codec is unused here (trajectories stay latents); the Conditioner only needs one to be complete.
    return Conditioner(encoder, IdentityCodec(), negative_prompt=args.negative_prompt)


def pack(out: Path, num_prompts: int, samples_per_shard: int, dtype: torch.dtype) -> dict:
    """Pack ``out/samples/*.safetensors`` into ``out`` once all ``num_prompts`` are there."""
    files = [sample_file(out / "samples", i) for i in range(num_prompts)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ShardFormatError(f"{len(missing)} of {num_prompts} trajectories are not generated yet, e.g. "
                               f"{missing[:3]}: run the generation (all ranks) to the end first")  # fmt: skip
    (out / INDEX_NAME).unlink(missing_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    samples = (read_sample_file(f, key=make_key(i)) for i, f in enumerate(files))
    return write_shards(samples, out, shard_sizes(num_prompts, samples_per_shard=samples_per_shard), dtype=dtype,
                        info={"tool": "generate_ode_pairs"})  # fmt: skip


def check_settings(folder: Path, settings: dict) -> None:
    """Record the generation settings in ``folder/settings.json``; a rerun with other settings is an error.

    Resuming must not mix trajectories from different teachers, schedules or seeds in one shard set.
    """
    path = folder / "settings.json"
    # Settings recorded by a run that wrote nothing (e.g. its teacher file was damaged) bind nothing: replace them.
    has_trajectories = path.is_file() and any(f.name != path.name for f in folder.iterdir())
    if has_trajectories:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): restore it or delete {folder}") from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{folder} holds trajectories made with other settings {diff} (stored, now): "
                             f"use another --out or delete {folder}")  # fmt: skip
    else:
        write_json_atomic(path, settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_ode_pairs.py",
        description="Teacher ODE trajectories (multi-step Euler + CFG, snapshots at the warped steps) "
        "as latent shards.",
    )
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or folder of .txt files")
    p.add_argument("--out", required=True, help="output folder: samples/ (per prompt), then shard-*.tar + index.json")
    p.add_argument("--teacher", help="teacher DiT weights: Wan / diffusers folder, .safetensors, Lightning .ckpt")
    p.add_argument("--preset", help="WanDiT preset (default: detected from the weights)")
    p.add_argument("--preset-overrides", type=json.loads, default={}, help="JSON of WanConfig fields to override")
    p.add_argument("--t5", help="UMT5 weights (Wan's models_t5_umt5-xxl-enc-bf16.pth or an HF folder)")
    p.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder")
    p.add_argument("--t5-fp32", action="store_true", help="run T5 in fp32 (the reference did) instead of bf16")
    p.add_argument("--toy-text", action="store_true", help="toy hashed-word text encoder (for toy teachers)")
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="unconditional text (default: Wan's)")
    p.add_argument("--latent-shape", type=_ints, default=[16, 21, 60, 104],
                   help="C,F,H,W of one latent video (default 16,21,60,104 = 81x480x832)")
    p.add_argument("--steps", type=int, default=48, help="Euler steps (default 48)")
    p.add_argument("--shift", type=float, default=8.0, help="schedule shift (default 8)")
    p.add_argument("--guidance", type=float, default=6.0, help="CFG scale (default 6)")
    p.add_argument("--keep", type=_floats, default=[1000.0, 750.0, 500.0, 250.0, 0.0],
                   help="unshifted snapshot timesteps, noisiest first (default 1000,750,500,250,0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (prompt i's noise depends on seed and i only)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per teacher call")
    p.add_argument("--keep-duplicates", action="store_true", help="do not drop repeated prompts")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--rank", type=int, help="this process's share (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", help="default: cuda:$LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="teacher dtype (reference: fp32)")
    p.add_argument("--storage-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="stored dtype")
    p.add_argument("--samples-per-shard", type=int, default=500, help="samples per shard when packing")
    p.add_argument("--pack-only", action="store_true", help="only pack out/samples into shards")
    p.add_argument("--no-pack", action="store_true", help="only generate (pack later with --pack-only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.out)
        prompts = read_prompts(args.prompts, deduplicate=not args.keep_duplicates)[: args.limit]
        storage = STORAGE_DTYPES[args.storage_dtype]
        snapshot_timesteps(args.steps, args.shift, args.keep)  # bad --keep/--steps fail before any model loads
        if len(args.latent_shape) != 4:
            raise ValueError(f"--latent-shape must be C,F,H,W, got {args.latent_shape}")
        if args.pack_only:
            index = pack(out, len(prompts), args.samples_per_shard, storage)
            print(f"packed {index['num_samples']} trajectories into {index['num_shards']} shard(s) -> {out}")
            return 0
        if not args.teacher:
            raise ValueError("--teacher is required (unless --pack-only)")
        rank = int(os.environ.get("RANK", 0)) if args.rank is None else args.rank
        world = int(os.environ.get("WORLD_SIZE", 1)) if args.world_size is None else args.world_size
        if args.device:
            device = torch.device(args.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device("cpu")
        dtype = STORAGE_DTYPES[args.dtype]
        check_settings(out / "samples", {
            "teacher": str(Path(args.teacher).resolve()), "preset": args.preset, "overrides": args.preset_overrides,
            "text": "toy" if args.toy_text else str(args.t5), "t5_fp32": args.t5_fp32,
            "negative_prompt": args.negative_prompt, "latent_shape": list(args.latent_shape), "steps": args.steps,
            "shift": args.shift, "guidance": args.guidance, "keep": list(args.keep), "seed": args.seed,
            "dtype": args.dtype, "prompts": str(Path(args.prompts).resolve()), "dedup": not args.keep_duplicates,
        })  # fmt: skip
        net = build_teacher(args.teacher, args.preset, args.preset_overrides, device, dtype)
        conditioner = build_conditioner(args, net, device)
        written = generate_ode_samples(
            net, conditioner, prompts, out / "samples", args.latent_shape, num_steps=args.steps, shift=args.shift,
            guidance=args.guidance, keep_timesteps=args.keep, seed=args.seed, batch_size=args.batch_size,
            rank=rank, world_size=world, device=device, dtype=dtype, storage_dtype=storage,
            progress=lambda done, total: print(f"[rank {rank}] {done}/{total}", flush=True),
        )
        print(f"[rank {rank}] generated {len(written)} trajectories -> {out / 'samples'}")
        if args.no_pack:
            return 0
        torchrun = world > 1 and "MASTER_ADDR" in os.environ and args.rank is None
        if torchrun:
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
            dist.barrier()  # every rank has finished its prompts
            dist.destroy_process_group()
        elif world > 1:
            print(f"[rank {rank}] when every rank is done, pack with: --pack-only (same --prompts and --out)")
            return 0
        if rank == 0:
            index = pack(out, len(prompts), args.samples_per_shard, storage)
            print(f"packed {index['num_samples']} trajectories into {index['num_shards']} shard(s) -> {out}")
    except (ValueError, FileNotFoundError) as err:
        print(f"generate_ode_pairs: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
