"""Encode videos to Wan VAE latents: one sample file (``<stem>.safetensors``) per video, resumable, several GPUs.

    python tools/encode_latents.py --videos videos/ --out latents/ --vae Wan2.1-T2V-14B/Wan2.1_VAE.pth \\
        --prompts prompts/ --frames 81 --height 480 --width 832
    torchrun --nproc-per-node 8 tools/encode_latents.py ...      # files split across the 8 GPUs

Each video is decoded with ffmpeg (imageio-ffmpeg), optionally resampled to ``--fps``, resized so that it covers
``--width`` x ``--height`` (``--resize`` filter, aspect ratio kept) and centre-cropped to exactly that size; the
first ``--frames`` frames (1 + 4k for the Wan VAE) are encoded. A video with fewer frames is an error naming the
file (or, with ``--skip-bad``, is listed in ``<out>/skipped-rank<r>.txt`` and skipped).

Output file: tensors ``latent`` [16, F, H/8, W/8] (``--storage-dtype``, bf16 by default) and ``first_frame``
[3, H, W] uint8 (the I2V conditioning image, after resize/crop); metadata ``prompt`` (with ``--prompts``) and
``source``. Files are written atomically; existing files are skipped, so an interrupted job just runs again.
Pack them with ``tools/make_shards.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from sfplus.datamodules.shard_format import STORAGE_DTYPES, Sample, slugify, write_sample_file
from sfplus.nets.vae import load_wan_vae

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
RESIZE_FILTERS = ("bicubic", "area", "bilinear", "lanczos")


# We resize inside ffmpeg on purpose: its warning that output and source sizes differ is noise here.
logging.getLogger("imageio_ffmpeg").addFilter(lambda record: "different from the source frame size" not in
                                              record.getMessage())


class VideoError(ValueError):
    """A video that cannot be read, is too short, or inputs that do not pair up (names the file)."""


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def find_videos(src: str | os.PathLike) -> list[Path]:
    """Videos in a folder (non-recursive, sorted by name) or listed in a text file (one path per line).

    Stems must be unique: they name the output files and pair videos with prompts.
    """
    src = Path(src)
    if src.is_dir():
        videos = sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_EXTS and p.is_file())
        if not videos:
            raise VideoError(f"{src}: no video files ({', '.join(VIDEO_EXTS)})")
    elif src.is_file():
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
        videos = [Path(ln) if Path(ln).is_absolute() else src.parent / ln for ln in lines if ln]
        missing = [str(v) for v in videos if not v.is_file()]
        if missing:
            raise VideoError(f"{src} lists {len(missing)} missing video(s), e.g. {missing[:3]}")
        if not videos:
            raise VideoError(f"{src}: the video list is empty")
    else:
        raise VideoError(f"{src} does not exist (expected a folder of videos or a text file listing them)")
    seen: dict[str, Path] = {}
    for v in videos:
        if v.stem in seen:
            raise VideoError(f"{seen[v.stem]} and {v} have the same stem {v.stem!r}: output names would collide")
        seen[v.stem] = v
    return videos


def read_prompt_map(src: str | os.PathLike, stems: Sequence[str]) -> dict[str, str]:
    """Prompts by stem from a folder of ``<stem>.txt`` files or a JSON object ``{stem: prompt}``.

    Every stem needs a non-empty prompt: missing ones are one error listing a few of them.
    """
    src = Path(src)
    if src.is_dir():
        found = {}
        for s in stems:
            f = src / f"{s}.txt"
            if f.is_file():
                found[s] = f.read_text(encoding="utf-8-sig").strip()
    elif src.is_file():
        try:
            data = json.loads(src.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise VideoError(f"{src}: not a JSON object {{stem: prompt}} ({err})") from None
        if not isinstance(data, dict):
            raise VideoError(f"{src}: expected a JSON object {{stem: prompt}}, got {type(data).__name__}")
        found = {s: str(data[s]).strip() for s in stems if s in data}
    else:
        raise VideoError(f"prompt source {src} does not exist (a folder of <stem>.txt files or a JSON file)")
    missing = [s for s in stems if not found.get(s)]
    if missing:
        raise VideoError(
            f"{src}: no (or an empty) prompt for {len(missing)} of {len(stems)} video(s), e.g. {missing[:5]}"
        )
    return found


def _ffmpeg_filters(width: int, height: int, fps: float | None, resize: str) -> str:
    if resize not in RESIZE_FILTERS:
        raise VideoError(f"--resize must be one of {RESIZE_FILTERS}, got {resize!r}")
    chain = [f"fps={fps:g}"] if fps else []
    # Cover the target size keeping the aspect ratio, then take the centre (crop centres by default).
    chain.append(f"scale={width}:{height}:force_original_aspect_ratio=increase:flags={resize}")
    chain.append(f"crop={width}:{height}")
    return ",".join(chain)


def read_frames(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    *,
    fps: float | None = None,
    resize: str = "bicubic",
) -> np.ndarray:
    """The first ``num_frames`` frames of a video (or the image, for ``num_frames=1``), resized + centre-cropped.

    Returns uint8 [num_frames, height, width, 3]. VideoError naming the file when it cannot be decoded or has
    fewer frames.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path} does not exist")
    vf = _ffmpeg_filters(width, height, fps, resize)
    frames = []
    try:
        reader = imageio_ffmpeg.read_frames(
            str(path), output_params=["-vf", vf, "-frames:v", str(num_frames)]
        )
        meta = next(reader)
        w, h = meta["size"]
        if (w, h) != (width, height):
            raise VideoError(f"{path}: ffmpeg produced {w}x{h} frames, expected {width}x{height}")
        for buf in reader:
            frames.append(np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3))
            if len(frames) == num_frames:
                break
        reader.close()
    except VideoError:
        raise
    except (RuntimeError, OSError, StopIteration, ValueError) as err:
        msg = str(err).strip().splitlines()
        raise VideoError(f"{path}: cannot decode ({msg[-1] if msg else type(err).__name__})") from None
    if len(frames) < num_frames:
        at = f" at {fps:g} fps" if fps else ""
        raise VideoError(f"{path}: has {len(frames)} frames{at}, needs {num_frames} (lower --frames to 1 + 4k)")
    return np.stack(frames)


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [1, 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    return (x / 127.5 - 1.0).unsqueeze(0)


# --------------------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------------------


def output_path(out_dir: str | os.PathLike, video: Path) -> Path:
    return Path(out_dir) / f"{video.stem}.safetensors"


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise VideoError(f"rank {rank} is outside [0, world size {world_size})")
    return rank, world_size


@torch.no_grad()
def encode_videos(
    videos: Sequence[Path],
    out_dir: str | os.PathLike,
    vae: torch.nn.Module,
    *,
    frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    resize: str = "bicubic",
    prompts: dict[str, str] | None = None,
    first_frame: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype = torch.bfloat16,
    skip_bad: bool = False,
    log=print,
) -> dict[str, int]:
    """Encode this rank's share (``videos[rank::world_size]``) into ``<out_dir>/<stem>.safetensors``.

    ``vae``: a :class:`~sfplus.nets.vae.WanVAE` (or any module with ``encode(video [B, 3, T, H, W] in [-1, 1])
    -> [B, C, F, h, w]`` and ``temporal_stride`` / ``spatial_stride``); it runs on ``device`` in ``dtype``.
    Returns counts ``{"encoded", "existing", "skipped"}`` for this rank.
    """
    ts, ss = int(vae.temporal_stride), int(vae.spatial_stride)
    if frames < 1 or (frames - 1) % ts:
        raise VideoError(f"--frames must be 1 + {ts}k for this VAE (e.g. {1 + 20 * ts}), got {frames}")
    if height % ss or width % ss:
        raise VideoError(f"--height/--width must be multiples of {ss} for this VAE, got {height}x{width}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = list(videos)[rank::world_size]
    counts = {"encoded": 0, "existing": 0, "skipped": 0}
    skipped_log = out_dir / f"skipped-rank{rank}.txt"
    start = time.perf_counter()
    for n, video in enumerate(mine, 1):
        out = output_path(out_dir, video)
        if out.exists():
            counts["existing"] += 1
            continue
        try:
            pixels = read_frames(video, frames, height, width, fps=fps, resize=resize)
        except VideoError as err:
            if not skip_bad:
                raise
            counts["skipped"] += 1
            with open(skipped_log, "a", encoding="utf-8") as f:
                f.write(f"{video}\t{err}\n")
            log(f"[rank {rank}] skipped: {err}")
            continue
        x = frames_to_video(pixels).to(device=device, dtype=dtype)
        latent = vae.encode(x)[0].float().cpu()
        sample = Sample(
            key=slugify(video.stem, 80) or "video",
            prompt=(prompts or {}).get(video.stem, ""),
            latent=latent.to(storage_dtype),
            first_frame=torch.from_numpy(pixels[0]).permute(2, 0, 1).contiguous() if first_frame else None,
            meta={"source": str(video), "frames": str(frames), "size": f"{width}x{height}",
                  **({"fps": f"{fps:g}"} if fps else {})},
        )  # fmt: skip
        write_sample_file(out, sample)
        counts["encoded"] += 1
        rate = counts["encoded"] / (time.perf_counter() - start)
        log(f"[rank {rank}] {n}/{len(mine)} {video.name} -> {tuple(latent.shape)} ({rate:.2f} videos/s)")
    return counts


def load_vae(path: str, config: str | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``load_wan_vae`` with an optional config (a JSON file or inline JSON of WanVAE keyword arguments)."""
    kwargs = {}
    if config:
        text = Path(config).read_text(encoding="utf-8") if Path(config).is_file() else config
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as err:
            raise VideoError(f"--vae-config {config!r}: neither a JSON file nor inline JSON ({err})") from None
        if not isinstance(kwargs, dict):
            raise VideoError(f"--vae-config must be a JSON object of WanVAE arguments, got {type(kwargs).__name__}")
    return load_wan_vae(path, device=device, dtype=dtype, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="encode_latents.py",
        description="Encode videos to Wan VAE latents, one <stem>.safetensors per video (resumable, multi-GPU).",
        epilog="Under torchrun every process takes every WORLD_SIZE-th video and uses GPU LOCAL_RANK.",
    )
    p.add_argument("--videos", required=True, help="folder of videos (mp4/avi/mov/mkv/webm) or a text file of paths")
    p.add_argument("--out", required=True, help="output folder of <stem>.safetensors files")
    p.add_argument("--vae", required=True, help="Wan2.1_VAE.pth, a .safetensors file or a diffusers (vae) folder")
    p.add_argument("--vae-config", help="WanVAE keyword arguments as JSON (file or inline); default: Wan2.1")
    p.add_argument("--prompts", help="folder of <stem>.txt prompts or a JSON {stem: prompt}; stored with latents")
    p.add_argument("--frames", type=int, default=81, help="frames to encode, 1 + 4k (default 81)")
    p.add_argument("--height", type=int, default=480, help="target height, multiple of 8 (default 480)")
    p.add_argument("--width", type=int, default=832, help="target width, multiple of 8 (default 832)")
    p.add_argument("--fps", type=float, help="resample to this frame rate first (Wan2.1: 16); default: keep")
    p.add_argument("--resize", default="bicubic", choices=RESIZE_FILTERS, help="ffmpeg scaling filter")
    p.add_argument("--no-first-frame", action="store_true", help="do not store the first frame (T2V only)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable / too short videos (listed in OUT/skipped-rank<r>.txt)")
    p.add_argument("--rank", type=int, help="this process's share (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", help="default: cuda:$LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="VAE compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--storage-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="stored latent dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rank, world = rank_and_world(args.rank, args.world_size)
        if args.device:
            device = torch.device(args.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device("cpu")
        dtype = STORAGE_DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        videos = find_videos(args.videos)
        prompts = read_prompt_map(args.prompts, [v.stem for v in videos]) if args.prompts else None
        vae = load_vae(args.vae, args.vae_config, device, dtype)
        counts = encode_videos(
            videos, args.out, vae, frames=args.frames, height=args.height, width=args.width, fps=args.fps,
            resize=args.resize, prompts=prompts, first_frame=not args.no_first_frame, rank=rank, world_size=world,
            device=device, dtype=dtype, storage_dtype=STORAGE_DTYPES[args.storage_dtype], skip_bad=args.skip_bad,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"encode_latents: error: {err}", file=sys.stderr)
        return 2
    print(f"[rank {rank}] done: {counts['encoded']} encoded, {counts['existing']} already there, "
          f"{counts['skipped']} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
