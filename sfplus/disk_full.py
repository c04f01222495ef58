"""A full disk while writing a checkpoint or a video: one error naming the file, what it needed and what was free.

The writers (:func:`sfplus.callbacks.checkpointing.atomic_save`, :func:`sfplus.video_io.write_mp4`) write under a
temporary name and delete it when the write fails, so nothing half-written is left; they turn the low-level failure
into :class:`DiskFullError` through :func:`disk_full_error`. A full disk shows up as ``OSError`` ``ENOSPC`` (or
``EDQUOT``, over quota) from Python file writes, but inside a ``CheckpointException`` (sharded saves) or as a
broken pipe plus a message on ffmpeg's stderr (videos): :func:`is_disk_full` recognises the errno and the message.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["DiskFullError", "disk_full_error", "free_bytes", "human_bytes", "is_disk_full"]

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXT = ("no space left on device", "disk quota exceeded")


class DiskFullError(OSError):
    """No space (or quota) left for a file sfplus writes; the message names the file and the sizes."""


def human_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing ancestor), None when unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write that ran out of space or quota."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if isinstance(err, (OSError, RuntimeError)) and any(t in str(err).lower() for t in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path: str | os.PathLike, needed: int | None, written: int | None = None) -> DiskFullError:
    """The error to raise when writing ``path`` failed for lack of space (``needed``: estimated total size)."""
    path = Path(path)
    free = free_bytes(path.parent)
    need = f"it needs about {human_bytes(needed)}" if needed else "it needs more"
    if written:
        need += f" ({human_bytes(written)} were written before the disk filled)"
    err = DiskFullError(
        f"no space left on the device to write {path}: {need}, {human_bytes(free)} free in {path.parent}; "
        f"nothing half-written was kept (free some space or write elsewhere)"
    )
    err.errno = errno.ENOSPC
    return err
