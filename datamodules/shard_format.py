"""Latent shards: the on-disk format (webdataset tar files + ``index.json``), writing, indexing and reading.

A *sample* is one training video in latent form:

==========================================  =====================================================================
tar member                                  content
==========================================  =====================================================================
``<key>.txt``                               the prompt, UTF-8
``<key>.latent.safetensors``                ``{"latent": [C, F, H, W]}`` (bf16 or fp16; C = 16 for the Wan VAE)
``<key>.first_frame.safetensors``           ``{"first_frame": [3, 8H, 8W]}`` uint8 RGB (I2V conditioning image)
``<key>.ode.safetensors``                   ``{"ode": [K, C, F, H, W], "timesteps": [K]}`` teacher ODE trajectory,
                                            noisiest → clean, ``timesteps`` on the 0..1000 scale
==========================================  =====================================================================

Every sample has ``txt`` and at least one of ``latent`` / ``ode``. Tensors are stored with safetensors (nothing is
ever unpickled). Keys contain only ``[A-Za-z0-9_-]`` (no dot), so ``wds.WebDataset`` groups members correctly and
the shards remain ordinary webdataset shards.

Next to the shards, ``index.json`` lists every shard with its samples and, for each member, ``[offset, size,
crc32]`` of its data inside the tar. Readers use it for random access (``seek`` + ``read``), which gives a map-style
dataset, an exact per-rank split and exact mid-epoch resume; the CRC and the tar header in front of each member
detect corrupt or stale data. :func:`scan_shards` rebuilds the index of shards written by other tools.

Shards are written by ``webdataset.TarWriter`` (the offsets come from the members it adds). They are read by hand
(:class:`ShardReader`), not with ``webdataset.WebDataset``, because webdataset streams a tar from its start: it is
an ``IterableDataset`` with no access by sample index. sfplus's samplers need a map-style dataset: sample ``i`` of a
per-epoch permutation, read in one seek, so that every rank takes an exact, equal share and a resumed run continues
at the module's count of consumed batches without replaying or skipping data; skipping through a stream to that
position would read the whole epoch up to it. :func:`scan_shards` reads tar headers with ``tarfile`` for the same
reason (webdataset's tar iterators give names and bytes, not offsets).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

FORMAT = "sfplus-latent-shards"
VERSION = 1
INDEX_NAME = "index.json"
SAMPLE_FILE_FORMAT = "sfplus-sample"

# tar member suffix of each sample entry
EXT_PROMPT = "txt"
EXT_LATENT = "latent.safetensors"
EXT_FIRST_FRAME = "first_frame.safetensors"
EXT_ODE = "ode.safetensors"
ENTRY_EXTS = (EXT_PROMPT, EXT_LATENT, EXT_FIRST_FRAME, EXT_ODE)

STORAGE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                  "fp32": torch.float32, "float32": torch.float32}  # fmt: skip

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
log = logging.getLogger("sfplus.datamodules.shards")


class ShardFormatError(ValueError):
    """Shards, an index or a sample file that do not follow the format (names the file and key)."""


class CorruptSampleError(ShardFormatError):
    """One sample cannot be read back (bad tar header, short read, CRC mismatch, undecodable tensor)."""


# --------------------------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sample in memory.

    Attributes:
        key: unique name, ``[A-Za-z0-9_-]+``.
        prompt: the text.
        latent: [C, F, H, W] clean latents, or None.
        first_frame: [3, H_px, W_px] uint8 RGB, or None.
        ode: [K, C, F, H, W] ODE trajectory (noisiest → clean), or None.
        ode_timesteps: [K] float32 timesteps of ``ode`` on the 0..1000 scale (required with ``ode``).
        meta: free-form string metadata (e.g. the source video), kept in sample files only.
    """

    key: str
    prompt: str
    latent: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None
    ode: torch.Tensor | None = None
    ode_timesteps: torch.Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str = "") -> None:
        """Raise ShardFormatError naming ``where``/key if shapes or dtypes are not those of the format."""
        at = f"{where}: sample {self.key!r}" if where else f"sample {self.key!r}"
        check_key(self.key, where)
        if not isinstance(self.prompt, str):
            raise ShardFormatError(f"{at}: prompt must be a str, got {type(self.prompt).__name__}")
        if self.latent is None and self.ode is None:
            raise ShardFormatError(f"{at}: needs a latent or an ODE trajectory")
        if self.latent is not None and (self.latent.ndim != 4 or not self.latent.is_floating_point()):
            raise ShardFormatError(f"{at}: latent must be a float [C, F, H, W] tensor, got {_desc(self.latent)}")
        if self.first_frame is not None and (
            self.first_frame.ndim != 3 or self.first_frame.shape[0] != 3 or self.first_frame.dtype != torch.uint8
        ):
            raise ShardFormatError(f"{at}: first_frame must be uint8 [3, H, W], got {_desc(self.first_frame)}")
        if self.ode is not None:
            if self.ode.ndim != 5 or not self.ode.is_floating_point():
                raise ShardFormatError(f"{at}: ode must be a float [K, C, F, H, W] tensor, got {_desc(self.ode)}")
            ts = self.ode_timesteps
            if ts is None or ts.ndim != 1 or ts.shape[0] != self.ode.shape[0]:
                raise ShardFormatError(
                    f"{at}: ode_timesteps must be a [K={self.ode.shape[0]}] tensor, got "
                    f"{None if ts is None else _desc(ts)}"
                )
            if self.latent is not None and tuple(self.latent.shape) != tuple(self.ode.shape[1:]):
                raise ShardFormatError(
                    f"{at}: latent {tuple(self.latent.shape)} and ode frames {tuple(self.ode.shape[1:])} differ"
                )


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"


def check_key(key: str, where: str = "") -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ShardFormatError(f"{where + ': ' if where else ''}sample key {key!r} must match [A-Za-z0-9_-]+")


def slugify(name: str, max_chars: int = 40) -> str:
    """``name`` reduced to ``[A-Za-z0-9_-]`` (other runs become ``-``), at most ``max_chars`` characters."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:max_chars].strip("-")


def make_key(index: int, name: str = "", max_chars: int = 40) -> str:
    """``00000012_my-video``: a unique, webdataset-safe key from a running index and a readable name."""
    slug = slugify(name, max_chars)
    return f"{index:08d}_{slug}" if slug else f"{index:08d}"


def tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    """safetensors bytes of ``{name: tensor}`` (CPU, contiguous)."""
    return st_save({name: tensor.detach().to("cpu").contiguous()})


def tensors_from_bytes(data: bytes, names: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes; CorruptSampleError naming ``where`` if undecodable or a tensor is missing."""
    try:
        out = st_load(bytes(data))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise CorruptSampleError(f"{where}: undecodable safetensors data ({err})") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise CorruptSampleError(f"{where}: safetensors data lacks {missing} (has {sorted(out)})")
    return out


def encode_sample(sample: Sample, dtype: torch.dtype | None = None) -> dict[str, bytes]:
    """Tar members of a sample: ``{ext: bytes}``. ``dtype`` converts latent and ODE (e.g. bf16); None keeps it."""
    sample.validate()
    members = {EXT_PROMPT: sample.prompt.encode("utf-8")}
    if sample.latent is not None:
        members[EXT_LATENT] = tensor_bytes("latent", sample.latent.to(dtype or sample.latent.dtype))
    if sample.first_frame is not None:
        members[EXT_FIRST_FRAME] = tensor_bytes("first_frame", sample.first_frame)
    if sample.ode is not None:
        ode = sample.ode.to(dtype or sample.ode.dtype)
        ts = sample.ode_timesteps.to(torch.float32)  # type: ignore[union-attr]
        members[EXT_ODE] = st_save({"ode": ode.contiguous(), "timesteps": ts.contiguous()})
    return members


def decode_member(ext: str, data: bytes, where: str) -> dict[str, torch.Tensor | str]:
    """Decode one member into sample fields: ``prompt`` / ``latent`` / ``first_frame`` / ``ode`` + ``ode_timesteps``."""
    if ext == EXT_PROMPT:
        try:
            return {"prompt": bytes(data).decode("utf-8")}
        except UnicodeDecodeError as err:
            raise CorruptSampleError(f"{where}: prompt is not UTF-8 ({err})") from None
    if ext == EXT_LATENT:
        t = tensors_from_bytes(data, ["latent"], where)["latent"]
        if t.ndim != 4:
            raise CorruptSampleError(f"{where}: latent has shape {tuple(t.shape)}, expected [C, F, H, W]")
        return {"latent": t}
    if ext == EXT_FIRST_FRAME:
        t = tensors_from_bytes(data, ["first_frame"], where)["first_frame"]
        if t.ndim != 3 or t.shape[0] != 3 or t.dtype != torch.uint8:
            raise CorruptSampleError(f"{where}: first_frame is {_desc(t)}, expected uint8 [3, H, W]")
        return {"first_frame": t}
    if ext == EXT_ODE:
        d = tensors_from_bytes(data, ["ode", "timesteps"], where)
        if d["ode"].ndim != 5 or d["timesteps"].shape != (d["ode"].shape[0],):
            raise CorruptSampleError(f"{where}: ode {_desc(d['ode'])} / timesteps {_desc(d['timesteps'])} malformed")
        return {"ode": d["ode"], "ode_timesteps": d["timesteps"]}
    raise ShardFormatError(f"{where}: unknown member type {ext!r}")


# --------------------------------------------------------------------------------------------------------------
# sample files (one sample per .safetensors file: what the encoding / generation tools write, resumably)
# --------------------------------------------------------------------------------------------------------------


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` (same folder, so that ``os.replace`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_sample_file(path: str | os.PathLike, sample: Sample) -> None:
    """Write a sample as one ``.safetensors`` file, atomically (temp name + rename).

    Tensors ``latent`` / ``first_frame`` / ``ode`` / ``ode_timesteps``; the prompt and ``sample.meta`` go into the
    safetensors metadata (strings).
    """

    sample.validate(str(path))
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in (("latent", sample.latent), ("first_frame", sample.first_frame), ("ode", sample.ode),
                        ("ode_timesteps", sample.ode_timesteps))
        if t is not None
    }  # fmt: skip
    meta = {**{str(k): str(v) for k, v in sample.meta.items()}, "format": SAMPLE_FILE_FORMAT, "prompt": sample.prompt}
    path = Path(path)
    tmp = atomic_path(path)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_sample_file(path: str | os.PathLike, key: str | None = None) -> Sample:
    """Read a file written by :func:`write_sample_file`; ``key`` defaults to a key made from the file stem.

    A file without a prompt in its metadata gets ``prompt = ""`` (the caller supplies one).
    """

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ShardFormatError(f"{path}: not a readable safetensors sample file ({err})") from None
    prompt = meta.pop("prompt", "")
    meta.pop("format", None)
    sample = Sample(
        key=key if key is not None else (slugify(path.stem, 80) or "sample"),
        prompt=prompt,
        latent=tensors.get("latent"),
        first_frame=tensors.get("first_frame"),
        ode=tensors.get("ode"),
        ode_timesteps=tensors.get("ode_timesteps"),
        meta=meta,
    )
    if sample.latent is None and sample.ode is None:
        raise ShardFormatError(f"{path}: holds neither 'latent' nor 'ode' (tensors: {sorted(tensors)})")
    return sample


# --------------------------------------------------------------------------------------------------------------
# writing shards
# --------------------------------------------------------------------------------------------------------------


def balanced_sizes(num_samples: int, num_shards: int) -> list[int]:
    """Split ``num_samples`` into ``num_shards`` sizes that differ by at most one (larger ones first)."""
    if num_samples <= 0:
        raise ShardFormatError("no samples to write")
    if num_shards <= 0:
        raise ShardFormatError(f"the number of shards must be positive, got {num_shards}")
    num_shards = min(num_shards, num_samples)
    q, r = divmod(num_samples, num_shards)
    return [q + 1] * r + [q] * (num_shards - r)


def shard_sizes(num_samples: int, *, num_shards: int | None = None, samples_per_shard: int | None = None) -> list[int]:
    """Balanced shard sizes from either a shard count or a maximum number of samples per shard."""
    if (num_shards is None) == (samples_per_shard is None):
        raise ShardFormatError("give exactly one of num_shards and samples_per_shard")
    if samples_per_shard is not None:
        if samples_per_shard <= 0:
            raise ShardFormatError(f"samples_per_shard must be positive, got {samples_per_shard}")
        num_shards = -(-num_samples // samples_per_shard)
    return balanced_sizes(num_samples, num_shards)  # type: ignore[arg-type]


class _ShardTarWriter:
    """Writes one tar (to a temporary name) with ``webdataset.TarWriter`` and records ``[offset, size, crc32]`` of
    every member's data, from the tar headers it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = atomic_path(path)
        self.file = open(self.tmp, "wb")
        # Fixed owner, mode and time: the same samples always give byte-identical shards.
        self.writer = wds.TarWriter(self.file, user="", group="", mode=0o644, mtime=0, encoder=False)
        self.tar = self.writer.tarstream
        self.samples: list[dict] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        entry: dict = {"key": key}
        offset, first = self.tar.offset, len(self.tar.members)
        self.writer.write({"__key__": key, **{ext: members[ext] for ext in ENTRY_EXTS if ext in members}})
        for info in self.tar.members[first:]:
            offset += len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
            data = members[info.name[len(key) + 1:]]
            entry[info.name[len(key) + 1:]] = [offset, info.size, zlib.crc32(data)]
            offset += -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if offset != self.tar.offset:
            raise ShardFormatError(f"{self.path}: member offsets of {key!r} do not add up (tar headers changed?)")
        self.samples.append(entry)

    def close(self) -> dict:
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "bytes": self.path.stat().st_size, "samples": self.samples}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _summary(sample: Sample) -> dict:
    s: dict = {"fields": [ext for ext in ENTRY_EXTS if ext != EXT_PROMPT and _has(sample, ext)]}
    if sample.latent is not None:
        s["latent_shape"] = list(sample.latent.shape)
    if sample.first_frame is not None:
        s["first_frame_shape"] = list(sample.first_frame.shape)
    if sample.ode is not None:
        s["ode_shape"] = list(sample.ode.shape)
        s["ode_timesteps"] = [round(float(t), 4) for t in sample.ode_timesteps]  # type: ignore[union-attr]
    return s


def _has(sample: Sample, ext: str) -> bool:
    return {EXT_LATENT: sample.latent, EXT_FIRST_FRAME: sample.first_frame, EXT_ODE: sample.ode}[ext] is not None


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    sizes: Sequence[int],
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    prefix: str = "shard",
    info: dict | None = None,
) -> dict:
    """Write ``samples`` into ``len(sizes)`` tar shards of the given sizes, then ``index.json``; return the index.

    All samples must hold the same fields with the same shapes (one batchable set); the first sample fixes them
    and any other is a ShardFormatError naming its key. Each shard is written under a temporary name and renamed
    when complete; ``index.json`` is written last, so a folder with an index is always complete.

    Args:
        samples: an iterable of exactly ``sum(sizes)`` samples (streamed: only one is in memory at a time).
        sizes: samples per shard (see :func:`shard_sizes`).
        dtype: storage dtype of latents and ODE trajectories (bf16/fp16/fp32); None keeps each tensor's dtype.
        prefix: shard file names are ``<prefix>-000000.tar``, ...
        info: extra JSON-able description stored in the index under ``"info"`` (source, tool arguments, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(sizes)
    it: Iterator[Sample] = iter(samples)
    shards: list[dict] = []
    summary: dict | None = None
    seen: set[str] = set()
    done = 0
    for j, size in enumerate(sizes):
        writer = _ShardTarWriter(out / f"{prefix}-{j:06d}.tar")
        try:
            for _ in range(size):
                try:
                    sample = next(it)
                except StopIteration:
                    raise ShardFormatError(f"write_shards: got {done} samples, expected {total}") from None
                if sample.key in seen:
                    raise ShardFormatError(f"write_shards: duplicate sample key {sample.key!r}")
                seen.add(sample.key)
                s = _summary(sample)
                if summary is None:
                    summary = s
                elif s != summary:
                    diff = {k: (summary.get(k), s.get(k)) for k in set(s) | set(summary) if s.get(k) != summary.get(k)}
                    raise ShardFormatError(
                        f"write_shards: sample {sample.key!r} differs from the first sample in {diff} "
                        f"(all samples of one shard set must batch together)"
                    )
                writer.add(sample.key, encode_sample(sample, dtype))
                done += 1
        except BaseException:
            writer.abort()
            raise
        shards.append(writer.close())
    if next(it, None) is not None:
        raise ShardFormatError(f"write_shards: more samples than the {total} planned")
    assert summary is not None
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else "as given"
    index = _make_index(shards, summary, dtype_name, info)
    write_index(out, index)
    return index


def _make_index(shards: list[dict], summary: dict, dtype_name: str, info: dict | None) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": sum(len(s["samples"]) for s in shards),
        "num_shards": len(shards),
        **summary,
        "dtype": dtype_name,
        "info": info or {},
        "shards": shards,
    }


def write_index(out_dir: str | os.PathLike, index: dict) -> Path:
    """Write ``index.json`` atomically (one line per shard keeps large indexes greppable)."""
    path = Path(out_dir) / INDEX_NAME
    tmp = atomic_path(path)
    try:
        compact = {"ensure_ascii": False, "separators": (",", ":")}
        head = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in index.items() if k != "shards"]
        shards = ",\n".join("    " + json.dumps(s, **compact) for s in index["shards"])  # type: ignore[arg-type]
        text = "{\n" + ",\n".join(head) + ',\n  "shards": [\n' + shards + "\n  ]\n}\n"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# index: reading, scanning, random access
# --------------------------------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: key = basename up to its first dot, ext = the rest."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return base, ""
    key, ext = base.split(".", 1)
    return key, ext


def scan_shards(out_dir: str | os.PathLike, pattern: str = "*.tar", *, write: bool = True) -> dict:
    """Build the index of the tar shards in ``out_dir`` (e.g. written by webdataset's ShardWriter) by reading them.

    Members other than the format's are ignored; samples without a prompt or without latent/ODE are dropped with a
    warning. A shard that is damaged part-way keeps the samples read before the damage (warning). The first
    complete sample fixes the expected fields and shapes; samples that differ are dropped with a warning.
    """
    out = Path(out_dir)
    files = sorted(out.glob(pattern))
    if not files:
        raise ShardFormatError(f"{out}: no shards matching {pattern!r}")
    shards, summary = [], None
    for path in files:
        groups: OrderedDict[str, dict] = OrderedDict()
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if ext not in ENTRY_EXTS:
                        continue
                    f.seek(m.offset_data)
                    data = f.read(m.size)
                    groups.setdefault(key, {"key": key})[ext] = [m.offset_data, m.size, zlib.crc32(data)]
        except (tarfile.TarError, OSError) as err:
            log.warning("%s: damaged after %d samples (%s); indexing those", path, len(groups), err)
        samples = []
        for key, entry in groups.items():
            if EXT_PROMPT not in entry or not (EXT_LATENT in entry or EXT_ODE in entry):
                log.warning("%s: sample %r lacks a prompt or latent/ode; skipped", path, key)
                continue
            try:
                check_key(key, str(path))
                s = _summary(read_entry(path, entry, key))
            except ShardFormatError as err:
                log.warning("%s; skipped", err)
                continue
            if summary is None:
                summary = s
            if s != summary:
                log.warning("%s: sample %r has fields/shapes %s, expected %s; skipped", path, key, s, summary)
                continue
            samples.append(entry)
        shards.append({"file": path.name, "bytes": path.stat().st_size, "samples": samples})
    if summary is None:
        raise ShardFormatError(f"{out}: no readable sample in {len(files)} shard(s)")
    index = _make_index(shards, summary, "as stored", {"scanned": True})
    if write:
        write_index(out, index)
    return index


def read_entry(path: str | os.PathLike, entry: dict, key: str, exts: Iterable[str] | None = None) -> Sample:
    """Read one indexed sample from its shard (no file handle caching; see :class:`ShardReader`)."""
    with open(path, "rb") as f:
        return ShardReader._read(f, str(path), entry, key, exts)


def load_index(path: str | os.PathLike) -> tuple[Path, dict]:
    """(shard folder, index) from a folder holding ``index.json`` or the index file itself."""
    p = Path(path)
    if not p.exists():
        raise ShardFormatError(f"shard folder {p} does not exist")
    file = p / INDEX_NAME if p.is_dir() else p
    if not file.is_file():
        hint = " (run `python tools/make_shards.py --reindex DIR` for shards made elsewhere)" if p.is_dir() else ""
        raise ShardFormatError(f"shard index {file} not found{hint}")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{file}: not a valid JSON index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get('format') if isinstance(index, dict) else type(index).__name__
        raise ShardFormatError(f"{file}: not an sfplus shard index (format {found!r})")
    if index.get("version", 0) > VERSION:
        raise ShardFormatError(f"{file}: index version {index['version']} is newer than this sfplus ({VERSION})")
    for s in index.get("shards", []):
        if "file" not in s or "samples" not in s:
            raise ShardFormatError(f"{file}: malformed shard entry {str(s)[:200]}")
    return file.parent, index


class ShardReader:
    """Random access to indexed samples; keeps a few shard files open per process.

    The per-sample index entries are packed into one int64 array per shard and member type (offset, size, crc32;
    -1 where a sample lacks the member), so a million-sample index costs tens of MB, not gigabytes, in each
    DataLoader worker. File handles are reopened after a fork, so one reader can be shared by workers.
    """

    def __init__(self, root: str | os.PathLike, index: dict, max_open: int = 16) -> None:
        self.root = Path(root)
        self.info = {k: v for k, v in index.items() if k != "shards"}
        self.files: list[str] = []
        self.sizes: list[int | None] = []
        self.keys: list[list[str]] = []
        self.tables: list[dict[str, np.ndarray]] = []
        for s in index["shards"]:
            self.files.append(s["file"])
            self.sizes.append(s.get("bytes"))
            self.keys.append([e["key"] for e in s["samples"]])
            table = {}
            for ext in ENTRY_EXTS:
                rows = [e.get(ext, (-1, -1, -1)) for e in s["samples"]]
                table[ext] = np.asarray(rows, dtype=np.int64).reshape(len(rows), 3)
            self.tables.append(table)
        self.max_open = max_open
        self._files: OrderedDict[int, io.BufferedReader] = OrderedDict()
        self._pid = os.getpid()

    def num_samples(self, shard: int) -> int:
        return len(self.keys[shard])

    def path(self, shard: int) -> Path:
        return self.root / self.files[shard]

    def entry(self, shard: int, row: int) -> dict:
        """The index entry ``{"key": ..., ext: [offset, size, crc32], ...}`` of one sample."""
        entry: dict = {"key": self.keys[shard][row]}
        for ext, table in self.tables[shard].items():
            if table[row, 0] >= 0:
                entry[ext] = [int(v) for v in table[row]]
        return entry

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def _file(self, shard: int) -> io.BufferedReader:
        if self._pid != os.getpid():
            self._files = OrderedDict()  # inherited handles share offsets with the parent: never use them
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            path = self.path(shard)
            try:
                f = open(path, "rb", buffering=0)  # type: ignore[assignment]
            except OSError as err:
                raise CorruptSampleError(f"{path}: cannot open shard ({err})") from None
            self._files[shard] = f  # type: ignore[assignment]
            if len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f  # type: ignore[return-value]

    def read(self, shard: int, row: int, exts: Iterable[str] | None = None) -> Sample:
        entry = self.entry(shard, row)
        return self._read(self._file(shard), str(self.path(shard)), entry, entry["key"], exts)

    @staticmethod
    def _read(f, path: str, entry: dict, key: str, exts: Iterable[str] | None) -> Sample:
        want = [EXT_PROMPT, *(e for e in (exts if exts is not None else ENTRY_EXTS) if e != EXT_PROMPT)]
        fields: dict = {}
        for ext in want:
            if ext not in entry:
                if exts is not None:
                    raise ShardFormatError(f"{path}: sample {key!r} has no {ext} member")
                continue
            offset, size, crc = entry[ext]
            where = f"{path}: {key}.{ext}"
            f.seek(offset - 512)
            buf = f.read(512 + size)
            if len(buf) != 512 + size:
                raise CorruptSampleError(f"{where}: short read (shard truncated?)")
            try:
                info = tarfile.TarInfo.frombuf(buf[:512], "utf-8", "surrogateescape")
            except tarfile.HeaderError as err:
                raise CorruptSampleError(f"{where}: bad tar header ({err})") from None
            name = f"{key}.{ext}"
            if info.size != size or (len(name) < 100 and info.name.rsplit("/", 1)[-1] != name):
                raise CorruptSampleError(f"{where}: tar header says {info.name!r}, {info.size} bytes (stale index?)")
            data = buf[512:]
            if zlib.crc32(data) != crc:
                raise CorruptSampleError(f"{where}: CRC mismatch (data damaged)")
            fields.update(decode_member(ext, data, where))
        return Sample(key=key, **fields)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
