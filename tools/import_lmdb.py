"""Import the reference's LMDB datasets (Self-Forcing / Self-Forcing-Plus) into sfplus latent shards.

    python tools/import_lmdb.py --lmdb data/i2v_14b_lmdb/ --out shards/i2v/          # shard_0 ... shard_15
    python tools/import_lmdb.py --lmdb data/ode_pairs_lmdb/ --out shards/ode/        # one env, ODE pairs

Understood layouts (rows ``{name}_{i}_data`` -> raw bytes, ``{name}_shape`` -> "N d1 d2 ..."):

* **I2V / clean latents** (``create_lmdb_14b_shards``): a folder of LMDB environments (``shard_0``, ...), rows
  ``latents`` (fp16 [F, 16, H, W]), ``prompts`` (UTF-8) and, when present, ``img`` (uint8 [8H, 8W, 3] first frame;
  its ``img_shape`` entry is wrong in the reference, so the size is taken from the latents or ``--image-size``).
* **ODE pairs** (``create_lmdb_iterative``): one environment, rows ``latents`` (fp16 [K, F, 16, H, W], noisiest →
  clean) and ``prompts``. The reference stores no timesteps: they are the unshifted ``--ode-steps`` (default
  1000,750,500,250,0) mapped through ``--ode-shift`` (default 8) = [1000, 960, 888.9, 727.3, 0].

Latents are transposed to sfplus's [16, F, H, W] (ODE: [K, 16, F, H, W]). Needs the ``lmdb`` package
(``pip install lmdb``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from sfplus.datamodules.shard_format import (
    INDEX_NAME,
    STORAGE_DTYPES,
    Sample,
    ShardFormatError,
    make_key,
    shard_sizes,
    write_shards,
)
from sfplus.flow import warp_timesteps


class LMDBImportError(ShardFormatError):
    """An LMDB that is missing, not in the reference layout, or has a bad row (names the env and row)."""


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise LMDBImportError(
            "reading LMDB datasets needs the `lmdb` package: pip install lmdb"
        ) from None
    return lmdb


def _natural(name: str) -> list:
    return [int(s) if s.isdecimal() else s for s in re.split(r"(\d+)", name)]


def find_envs(path: str | Path) -> list[Path]:
    """One LMDB environment (a folder with data.mdb) or a folder of them (sorted by name)."""
    p = Path(path)
    if not p.exists():
        raise LMDBImportError(f"{p} does not exist")
    if (p / "data.mdb").is_file():
        return [p]
    envs = sorted((d for d in p.iterdir() if (d / "data.mdb").is_file()), key=lambda d: _natural(d.name))
    if not envs:
        raise LMDBImportError(f"{p}: neither an LMDB environment (data.mdb) nor a folder of them")
    return envs


class RowReader:
    """Reads the reference's row format from one environment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = _lmdb().open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                                max_readers=1)  # fmt: skip
        # buffers=True: values are views into the memory map, so checking a row's size reads no data.
        self.txn = self.env.begin(write=False, buffers=True)
        shape = self.get("latents_shape")
        shape = bytes(shape) if shape is not None else None
        if shape is None:
            raise LMDBImportError(f"{path}: no 'latents_shape' entry: not a Self-Forcing LMDB")
        try:
            dims = [int(v) for v in shape.decode().split()]
        except (UnicodeDecodeError, ValueError):
            raise LMDBImportError(f"{path}: latents_shape {shape[:80]!r} is not space-separated integers") from None
        if len(dims) not in (5, 6):
            raise LMDBImportError(
                f"{path}: latents_shape {dims} is neither N F C H W (latents) nor N K F C H W (ODE pairs)"
            )
        self.rows, self.row_shape = dims[0], tuple(dims[1:])
        self.has_img = self.get("img_0_data") is not None

    def get(self, key: str) -> memoryview | None:
        return self.txn.get(key.encode())

    def row(self, name: str, i: int) -> memoryview:
        data = self.get(f"{name}_{i}_data")
        if data is None:
            raise LMDBImportError(f"{self.path}: row {i} has no {name!r} entry")
        return data

    def prompt(self, i: int) -> str:
        try:
            return bytes(self.row("prompts", i)).decode("utf-8")
        except UnicodeDecodeError:
            raise LMDBImportError(f"{self.path}: row {i} prompt is not UTF-8") from None

    def latents(self, i: int) -> torch.Tensor:
        """fp16 row in sfplus layout: [C, F, H, W] (or [K, C, F, H, W] for ODE rows)."""
        data = self.row("latents", i)
        n = int(np.prod(self.row_shape)) * 2
        if len(data) != n:
            raise LMDBImportError(f"{self.path}: row {i} latents have {len(data)} bytes, expected {n} for "
                                  f"fp16 {list(self.row_shape)}")  # fmt: skip
        x = torch.from_numpy(np.frombuffer(data, dtype=np.float16).reshape(self.row_shape).copy())
        return x.transpose(-4, -3).contiguous()  # [.., F, C, H, W] -> [.., C, F, H, W]

    def check(self, i: int, image_size: tuple[int, int] | None) -> str | None:
        """Why row ``i`` cannot be imported (missing / wrongly sized entries), or None; reads no tensor data."""
        try:
            self.prompt(i)
            n = int(np.prod(self.row_shape)) * 2
            if len(self.row("latents", i)) != n:
                return f"{self.path}: row {i} latents are not fp16 {list(self.row_shape)}"
            if image_size is not None and len(self.row("img", i)) != image_size[0] * image_size[1] * 3:
                return f"{self.path}: row {i} image is not {image_size[0]}x{image_size[1]}x3"
        except LMDBImportError as err:
            return str(err)
        return None

    def image(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        """uint8 [3, H, W] first frame."""
        data = self.row("img", i)
        h, w = size
        if len(data) != h * w * 3:
            raise LMDBImportError(f"{self.path}: row {i} image has {len(data)} bytes, not {h}x{w}x3 = {h * w * 3} "
                                  f"(pass --image-size HxW)")  # fmt: skip
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3).copy()).permute(2, 0, 1)

    def close(self) -> None:
        self.txn.abort()
        self.env.close()


def _image_size(arg: str | None, reader: RowReader) -> tuple[int, int]:
    if arg:
        m = re.fullmatch(r"(\d+)[xX](\d+)", arg.strip())
        if not m:
            raise LMDBImportError(f"--image-size must be HxW (e.g. 480x832), got {arg!r}")
        return int(m.group(1)), int(m.group(2))
    h, w = reader.row_shape[-2:]
    return 8 * h, 8 * w


def import_lmdb(
    path: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int | None = 1000,
    num_shards: int | None = None,
    dtype: torch.dtype = torch.float16,
    image_size: str | None = None,
    with_images: bool = True,
    ode_steps: Sequence[float] = (1000.0, 750.0, 500.0, 250.0, 0.0),
    ode_shift: float = 8.0,
    dedup: bool = False,
    min_prompt_chars: int = 0,
    skip_bad: bool = False,
    limit: int | None = None,
    log=print,
) -> dict:
    """Convert the LMDB(s) at ``path`` into shards in ``out_dir``; returns the index. See the module docstring."""
    readers = [RowReader(p) for p in find_envs(path)]
    try:
        shapes = {r.row_shape for r in readers}
        if len(shapes) > 1:
            raise LMDBImportError(f"{path}: environments hold different latent shapes {sorted(shapes)}")
        ode = len(readers[0].row_shape) == 5
        imgs = with_images and not ode and all(r.has_img for r in readers)
        if with_images and not ode and any(r.has_img for r in readers) and not imgs:
            log(f"warning: only some environments in {path} hold first frames; importing without them")
        timesteps = None
        if ode:
            k = readers[0].row_shape[0]
            if len(ode_steps) != k:
                raise LMDBImportError(f"{path}: ODE rows hold {k} snapshots but --ode-steps gives {len(ode_steps)}")
            timesteps = torch.tensor(warp_timesteps(ode_steps, ode_shift), dtype=torch.float32)
        sizes_hw = _image_size(image_size, readers[0]) if imgs else None

        # Pass 1: prompts only (cheap) -> which rows to keep.
        plan: list[tuple[int, int, str]] = []
        seen: set[str] = set()
        bad = short = dup = 0
        for e, r in enumerate(readers):
            for i in range(r.rows):
                try:
                    prompt = r.prompt(i).strip()
                except LMDBImportError as err:
                    if not skip_bad:
                        raise
                    bad += 1
                    log(f"skipped: {err}")
                    continue
                if len(prompt) < max(1, min_prompt_chars):
                    short += 1
                    continue
                if dedup and prompt in seen:
                    dup += 1
                    continue
                seen.add(prompt)
                plan.append((e, i, prompt))
                if limit is not None and len(plan) >= limit:
                    break
            if limit is not None and len(plan) >= limit:
                break

        if skip_bad:  # rows with missing or wrongly sized entries are dropped before shard sizes are fixed
            good = []
            for e, i, prompt in plan:
                problem = readers[e].check(i, sizes_hw)
                if problem:
                    bad += 1
                    log(f"skipped: {problem}")
                else:
                    good.append((e, i, prompt))
            plan = good

        def rows() -> Iterator[Sample]:
            for n, (e, i, prompt) in enumerate(plan):
                r = readers[e]
                x = r.latents(i)
                s = Sample(key=make_key(n, f"{r.path.name}-{i}"), prompt=prompt)
                if ode:
                    s.ode, s.ode_timesteps = x, timesteps
                else:
                    s.latent = x
                    if imgs:
                        s.first_frame = r.image(i, sizes_hw)  # type: ignore[arg-type]
                yield s

        if not plan:
            raise LMDBImportError(f"{path}: no row left to import (bad {bad}, short prompt {short}, duplicate {dup})")
        per_shard = None if num_shards else samples_per_shard
        sizes = shard_sizes(len(plan), num_shards=num_shards, samples_per_shard=per_shard)
        info = {"tool": "import_lmdb", "source": str(path), "layout": "ode" if ode else "latents",
                "skipped": {"bad": bad, "short_prompt": short, "duplicate": dup}}  # fmt: skip
        return write_shards(rows(), out_dir, sizes, dtype=dtype, info=info)
    finally:
        for r in readers:
            r.close()


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="import_lmdb.py",
        description="Import Self-Forcing(-Plus) LMDB datasets (sharded I2V latents with first frames, or ODE "
        "pairs) into sfplus latent shards. Needs `pip install lmdb`.",
    )
    p.add_argument("--lmdb", required=True, help="an LMDB environment (folder with data.mdb) or a folder of them")
    p.add_argument("--out", required=True, help="output folder (shard-*.tar + index.json)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=1000, help="at most this many samples per shard")
    size.add_argument("--num-shards", type=int, help="exactly this many shards (sizes balanced)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="stored latent dtype (default fp16: the LMDB's own, lossless)")
    p.add_argument("--image-size", help="first-frame size HxW (default: 8x the latent size, e.g. 480x832)")
    p.add_argument("--no-images", action="store_true", help="do not import first frames")
    p.add_argument("--ode-steps", type=_floats, default=[1000.0, 750.0, 500.0, 250.0, 0.0],
                   help="unshifted timesteps of the ODE snapshots (default 1000,750,500,250,0)")
    p.add_argument("--ode-shift", type=float, default=8.0, help="shift of the ODE-pair schedule (default 8)")
    p.add_argument("--dedup", action="store_true", help="keep the first row of each prompt (the reference did)")
    p.add_argument("--min-prompt-chars", type=int, default=0, help="skip shorter prompts (reference 14B: 300)")
    p.add_argument("--skip-bad", action="store_true", help="skip rows with missing or malformed entries")
    p.add_argument("--limit", type=int, help="import at most this many rows (a quick look)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.out)
        if (out / INDEX_NAME).exists():
            if not args.overwrite:
                raise ShardFormatError(f"{out} already holds a shard set ({INDEX_NAME}); pass --overwrite")
            (out / INDEX_NAME).unlink()
            for old in out.glob("shard-*.tar"):
                old.unlink()
        index = import_lmdb(
            args.lmdb, out, samples_per_shard=args.samples_per_shard, num_shards=args.num_shards,
            dtype=STORAGE_DTYPES[args.dtype], image_size=args.image_size, with_images=not args.no_images,
            ode_steps=args.ode_steps, ode_shift=args.ode_shift, dedup=args.dedup,
            min_prompt_chars=args.min_prompt_chars, skip_bad=args.skip_bad, limit=args.limit,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"import_lmdb: error: {err}", file=sys.stderr)
        return 2
    print(f"imported {index['num_samples']} samples ({index['info']['layout']}, fields {index['fields']}) into "
          f"{index['num_shards']} shard(s) -> {out} (skipped: {index['info']['skipped']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
