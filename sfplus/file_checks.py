"""Every file sfplus reads is checked at the door: a damaged or wrong file is one error naming it and its fault.

The readers here wrap ``torch.load`` (always ``weights_only=True``: a pickle that refers to Python code is refused,
never run), safetensors and YAML configs. Each raises ``error`` (a ``ValueError``; callers pass their own
subclass, e.g. :class:`sfplus.weights.checkpoints.CheckpointError`) with a one-line message of the form
``<what> <path> <what is wrong>``, which ``sfplus``'s command line prints as ``sfplus: error: ...``.

What is recognised before anything is parsed: a missing path, a folder where a file is expected, an empty file, an
unreadable file. Torch files are told apart by their first bytes: zip (``PK\\x03\\x04``, what ``torch.save`` writes)
or a legacy pickle (``\\x80``); anything else "is not a PyTorch file". A zip that cannot be opened is truncated or
damaged; a pickle that names a Python global is refused.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

__all__ = [
    "DamagedFileError",
    "check_file",
    "load_safetensors",
    "load_yaml",
    "open_safetensors",
    "torch_load",
    "torch_load_mapping",
]

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)


class DamagedFileError(ValueError):
    """A file sfplus reads is missing, unreadable, damaged or of the wrong kind (names the file and the fault)."""


def _first_line(err: BaseException) -> str:
    # Torch's messages run to several paragraphs (links to docs, advice about weights_only); the first line says it.
    text = str(err).strip().splitlines()
    return text[0].strip() if text else type(err).__name__


def _unpickling_reason(err: BaseException) -> str:
    # torch's weights-only refusal opens with a paragraph about the weights_only default; the line that names the
    # refused global or opcode comes after it.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("Unsupported", "Trying to load unsupported")) or "GLOBAL" in line:
            return line.rstrip(".")
    return lines[-1] if lines else type(err).__name__


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_file(path: str | os.PathLike, what: str, error: type[ValueError] = DamagedFileError) -> Path:
    """``path`` as a ``Path`` if it is a readable, non-empty regular file; else ``error`` saying why not."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a folder, not a file")
    if not p.is_file():
        raise error(f"{what} {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise error(f"{what} {p} cannot be read (permission denied)")
    if p.stat().st_size == 0:
        raise error(f"{what} {p} is empty (0 bytes): an interrupted copy or save?")
    return p


def _head(p: Path, n: int = 4) -> bytes:
    with open(p, "rb") as fh:
        return fh.read(n)


def torch_load(path: str | os.PathLike, what: str = "checkpoint", error: type[ValueError] = DamagedFileError,
               mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, memory-mapped when the format allows, with one-line errors.

    Never unpickles Python objects other than tensors and plain containers: such a file is refused.
    """
    p = check_file(path, what, error)
    head = _head(p)
    is_zip = head.startswith(ZIP_MAGIC)
    if not is_zip and (not head or head[0] != PICKLE_PROTO):
        raise error(f"{what} {p} is not a PyTorch file (it starts with bytes {head.hex()}, not a zip archive "
                    f"or a pickle): a wrong or damaged file")
    if is_zip and not zipfile.is_zipfile(p):
        raise error(f"{what} {p} is truncated or damaged: its zip archive has no end ({_size(p.stat().st_size)})")
    try:
        # mmap needs the zip format: legacy (pickle) files are read whole.
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        if "global" in reason.lower():
            raise error(f"{what} {p} holds Python code, not only weights, and was refused ({reason}): sfplus loads "
                        f"files with weights_only=True") from None
        raise error(f"{what} {p} is damaged or not a PyTorch checkpoint (unpickling failed: {reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise error(f"{what} {p} is truncated or damaged ({type(err).__name__}: {_first_line(err)})") from None


def torch_load_mapping(path: str | os.PathLike, what: str = "checkpoint",
                       error: type[ValueError] = DamagedFileError, mmap: bool = True) -> dict:
    """:func:`torch_load` of a file that must hold a dict (a state dict or a Lightning checkpoint)."""
    obj = torch_load(path, what, error, mmap)
    if not isinstance(obj, Mapping):
        raise error(f"{what} {path} holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def _safetensors_error(p: Path, what: str, err: BaseException, error: type[ValueError]) -> ValueError:
    reason = _first_line(err)
    return error(f"{what} {p} is not a valid safetensors file or is truncated ({reason}; "
                 f"{_size(p.stat().st_size)})")


@contextmanager
def open_safetensors(path: str | os.PathLike, what: str = "weights file",
                     error: type[ValueError] = DamagedFileError, device: str = "cpu") -> Iterator[Any]:
    """``safetensors.safe_open`` (reads only the header until tensors are asked for), with one-line errors."""

    p = check_file(path, what, error)
    try:
        handle = safe_open(str(p), framework="pt", device=device)
    except Exception as err:  # the Rust side raises SafetensorError, OSError or others, not one Python type
        raise _safetensors_error(p, what, err, error) from None
    with handle as fh:
        yield fh


def load_safetensors(path: str | os.PathLike, what: str = "weights file",
                     error: type[ValueError] = DamagedFileError, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, with one-line errors (header and truncated data alike)."""

    p = check_file(path, what, error)
    try:
        return load_file(str(p), device=device)
    except Exception as err:  # SafetensorError (bad header, data shorter than the header says) or OSError
        raise _safetensors_error(p, what, err, error) from None


def load_yaml(path: str | os.PathLike, what: str = "config", error: type[ValueError] = DamagedFileError) -> Any:
    """The YAML document in ``path``; a syntax error names the file, line and column."""

    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a folder, not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} {p} is not UTF-8 text (byte {err.start}): not a YAML file?") from None
    except OSError as err:
        raise error(f"{what} {p} cannot be read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _first_line(err)
        raise error(f"{what} {p} is not valid YAML: {problem}{where}") from None
