"""Writing results: MP4 through imageio-ffmpeg and JSON sidecars, always atomically (temp name + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

from sfplus.disk_full import disk_full_error, is_disk_full


def safe_stem(text: str, index: int, sample: int, max_chars: int = 48) -> str:
    """A file-system-safe, unique, bounded name for a prompt's output, whatever the prompt holds.

    ``000012_s00_a-red-square-moving-left_1a2b3c4d``: the prompt index, the sample index, an ASCII slug of at
    most ``max_chars`` characters, and 8 hex digits of the prompt's SHA-256 (so prompts that slug alike differ).
    """
    slug = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", slug).strip("-").lower()[:max_chars].strip("-") or "prompt"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{index:06d}_s{sample:02d}_{slug}_{digest}"


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # before the temp file: a bad value leaves none
    tmp = _atomic_target(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, len(text.encode("utf-8"))) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 16, upscale: int = 1) -> None:
    """Write uint8 frames [T, H, W, 3] as an H.264 MP4 at ``fps``, atomically.

    ``upscale`` repeats pixels (nearest neighbour) so tiny toy videos are watchable. Odd sizes are padded by one
    pixel (yuv420p needs even sizes).
    """

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            macro_block_size=1, output_params=["-loglevel", "error"], quality=8,
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if is_disk_full(err):
            # The encoded size is unknown in advance: report what was written before the disk filled.
            raise disk_full_error(path, None, tmp.stat().st_size if tmp.exists() else None) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Read an MP4 back as uint8 [T, H, W, 3] (tests and evaluation)."""

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames)
