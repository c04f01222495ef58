"""Pack per-video sample files (from ``encode_latents.py`` / ``generate_ode_pairs.py``) into balanced latent shards.

    python tools/make_shards.py --latents latents/ --out shards/ --samples-per-shard 500
    python tools/make_shards.py --latents latents/ --prompts prompts/ --out shards/ --num-shards 64
    python tools/make_shards.py --reindex shards/          # write index.json for shards made by other tools

The output folder holds ``shard-000000.tar``, ... (webdataset tar files; shard sizes differ by at most one sample)
and ``index.json`` (every member's byte range and CRC, which ``LatentShardDataModule`` reads). Every input must have
the same latent shape (one batchable set); a different one is an error naming the file. Prompts come from the sample
files' metadata or from ``--prompts`` (a folder of ``<stem>.txt`` files or a JSON object ``{stem: prompt}``), which
wins when both exist. First frames come from the sample files, or from ``--first-frames`` (a folder of
``<stem>.png/.jpg/.webp`` images, resized and centre-cropped to the video size).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from sfplus.datamodules.shard_format import (
    INDEX_NAME,
    STORAGE_DTYPES,
    ShardFormatError,
    make_key,
    read_sample_file,
    scan_shards,
    shard_sizes,
    write_shards,
)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _encode_latents_module():
    """tools/encode_latents.py (its video/image reader), importable whether this file runs as a script or not."""
    if "encode_latents" in sys.modules:
        return sys.modules["encode_latents"]
    path = Path(__file__).with_name("encode_latents.py")
    spec = importlib.util.spec_from_file_location("encode_latents", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["encode_latents"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _natural(name: str) -> list:
    return [int(s) if s.isdecimal() else s for s in re.split(r"(\d+)", name)]


def sample_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardFormatError(f"--latents {folder} is not a folder")
    files = sorted(folder.glob("*.safetensors"), key=lambda p: _natural(p.name))
    if not files:
        raise ShardFormatError(f"{folder}: no .safetensors sample files")
    return files


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {tensor: shape}) without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise ShardFormatError(f"{path}: not a readable safetensors sample file ({err})") from None


def plan(
    files: Sequence[Path],
    *,
    prompts: dict[str, str] | None = None,
    first_frames: str | Path | None = None,
    min_prompt_chars: int = 0,
    dedup: bool = False,
) -> tuple[list[tuple[Path, str, Path | None]], dict[str, int]]:
    """Check all inputs before anything is written; return ``[(file, prompt, image or None)]`` and skip counts.

    Errors (one message, naming files): a missing prompt, a missing first-frame image, shapes that differ.
    """
    kept: list[tuple[Path, str, Path | None]] = []
    shapes: Counter = Counter()
    first_shape: dict[tuple, Path] = {}
    skipped = {"short_prompt": 0, "duplicate": 0}
    seen: set[str] = set()
    missing_prompt, missing_image = [], []
    for f in files:
        meta, tensors = _header(f)
        if "latent" not in tensors and "ode" not in tensors:
            raise ShardFormatError(f"{f}: holds neither 'latent' nor 'ode' (tensors: {sorted(tensors)})")
        prompt = (prompts or {}).get(f.stem) or meta.get("prompt", "")
        if not prompt.strip():
            missing_prompt.append(f.name)
            continue
        prompt = prompt.strip()
        if len(prompt) < min_prompt_chars:
            skipped["short_prompt"] += 1
            continue
        if dedup:
            if prompt in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(prompt)
        image = None
        if first_frames is not None:
            image = next((Path(first_frames) / f"{f.stem}{e}" for e in IMAGE_EXTS
                          if (Path(first_frames) / f"{f.stem}{e}").is_file()), None)  # fmt: skip
            if image is None:
                missing_image.append(f.stem)
        key = tuple(sorted((k, v) for k, v in tensors.items() if k != "first_frame" or first_frames is None))
        shapes[key] += 1
        first_shape.setdefault(key, f)
        kept.append((f, prompt, image))
    if missing_prompt:
        raise ShardFormatError(
            f"{len(missing_prompt)} sample file(s) have no prompt (give --prompts), e.g. {missing_prompt[:5]}"
        )
    if missing_image:
        raise ShardFormatError(f"--first-frames {first_frames}: no image for {len(missing_image)} stem(s), "
                               f"e.g. {missing_image[:5]}")  # fmt: skip
    if len(shapes) > 1:
        desc = "; ".join(f"{n} file(s) like {first_shape[k].name}: {dict(k)}" for k, n in shapes.most_common())
        raise ShardFormatError(f"sample files differ in tensors or shapes (one shard set must batch): {desc}")
    if not kept:
        raise ShardFormatError(f"no sample left to write (skipped: {skipped})")
    return kept, skipped


def iter_samples(
    kept: Sequence[tuple[Path, str, Path | None]], *, first_frame: bool = True, spatial_stride: int = 8
) -> Iterator:
    """Samples (keys ``<index:08d>_<stem>``) for :func:`write_shards`, read one at a time."""
    for i, (f, prompt, image) in enumerate(kept):
        s = read_sample_file(f, key=make_key(i, f.stem))
        s.prompt = prompt
        if image is not None:
            if s.latent is None:
                raise ShardFormatError(f"{f}: no latent to size the first frame {image} by")
            h, w = s.latent.shape[-2] * spatial_stride, s.latent.shape[-1] * spatial_stride
            frame = _encode_latents_module().read_frames(image, 1, h, w)[0]
            s.first_frame = torch.from_numpy(frame).permute(2, 0, 1).contiguous()
        if not first_frame:
            s.first_frame = None
        yield s


def read_prompts_arg(src: str, stems: Sequence[str]) -> dict[str, str]:
    p = Path(src)
    if p.is_dir():
        return {s: (p / f"{s}.txt").read_text(encoding="utf-8-sig") for s in stems if (p / f"{s}.txt").is_file()}
    if p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise ShardFormatError(f"--prompts {p}: not a JSON object {{stem: prompt}} ({err})") from None
        if not isinstance(data, dict):
            raise ShardFormatError(f"--prompts {p}: expected a JSON object {{stem: prompt}}")
        return {str(k): str(v) for k, v in data.items()}
    raise ShardFormatError(f"--prompts {p} does not exist")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Pack sample files (latents + prompts + first frames / ODE trajectories) into balanced "
        "webdataset shards with an index.json.",
    )
    p.add_argument("--latents", help="folder of <stem>.safetensors sample files (from encode_latents.py)")
    p.add_argument("--out", help="output folder (shard-*.tar + index.json)")
    p.add_argument("--prompts", help="folder of <stem>.txt or JSON {stem: prompt}; overrides stored prompts")
    p.add_argument("--first-frames", help="folder of <stem>.png/.jpg/.webp first frames (default: stored ones)")
    p.add_argument("--no-first-frame", action="store_true", help="drop first frames (T2V data)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="at most this many samples per shard (default 1000)")
    size.add_argument("--num-shards", type=int, help="exactly this many shards (sizes balanced)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="stored latent dtype")
    p.add_argument("--min-prompt-chars", type=int, default=0,
                   help="skip samples whose prompt is shorter (the reference's 14B data used 300)")
    p.add_argument("--dedup", action="store_true", help="keep only the first sample of each prompt")
    p.add_argument("--spatial-stride", type=int, default=8, help="pixels per latent cell, for --first-frames")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    p.add_argument("--reindex", metavar="DIR", help="only (re)write DIR/index.json by reading DIR/*.tar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.reindex:
            index = scan_shards(args.reindex)
            print(f"indexed {index['num_samples']} samples in {index['num_shards']} shard(s) -> "
                  f"{Path(args.reindex) / INDEX_NAME}")
            return 0
        if not args.latents or not args.out:
            raise ShardFormatError("--latents and --out are required (or --reindex DIR)")
        out = Path(args.out)
        if (out / INDEX_NAME).exists() and not args.overwrite:
            raise ShardFormatError(f"{out} already holds a shard set ({INDEX_NAME}); pass --overwrite to replace it")
        files = sample_files(args.latents)
        prompts = read_prompts_arg(args.prompts, [f.stem for f in files]) if args.prompts else None
        kept, skipped = plan(files, prompts=prompts, first_frames=args.first_frames,
                             min_prompt_chars=args.min_prompt_chars, dedup=args.dedup)  # fmt: skip
        sizes = shard_sizes(len(kept), num_shards=args.num_shards,
                            samples_per_shard=None if args.num_shards else (args.samples_per_shard or 1000))
        if args.overwrite:
            (out / INDEX_NAME).unlink(missing_ok=True)  # first: a folder with an index must be complete
            for old in out.glob("shard-*.tar"):
                old.unlink()
        info = {"tool": "make_shards", "latents": str(args.latents), "skipped": skipped}
        index = write_shards(
            iter_samples(kept, first_frame=not args.no_first_frame, spatial_stride=args.spatial_stride),
            out, sizes, dtype=STORAGE_DTYPES[args.dtype], info=info,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index['num_samples']} samples in {index['num_shards']} shard(s) of {min(sizes)}-{max(sizes)} "
          f"samples -> {out} (skipped: {skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
