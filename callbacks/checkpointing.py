"""Checkpoints that are never half-written, on the module's own counter, and the path to resume from.

Lightning's ``ModelCheckpoint`` counts ``trainer.global_step`` (every optimizer update), warns on every save under
manual optimization and, with sharded (directory) checkpoints, overwrites ``last.ckpt`` in place, so a job killed
mid-save leaves a directory that still looks valid (Lightning takes a directory with rank 0's ``meta.pt``, written
last, for a complete sharded checkpoint). :class:`AtomicCheckpoint` replaces it for sfplus configs:

* periodic checkpoints ``<dirpath>/iteration-00001000.ckpt`` every ``every_n_iterations`` of the module's
  ``iteration`` counter, the newest ``keep_last`` kept;
* ``<dirpath>/last.ckpt``: the newest state, published after every periodic save (hard links, no second write)
  and at the end of training;
* every checkpoint is written under a temporary name in the same folder and renamed into place only when complete
  (:func:`atomic_save`); single files and sharded directories (``ModelParallelStrategy``) go through the same code.

:func:`resume_path` answers "what should ``--ckpt_path`` be?" for a requeued job (``None`` on a first start).

Crash safety of a directory replacement: a directory cannot be swapped over another atomically, so the old one is
first renamed to ``.last.ckpt.old``, the new one renamed into place, and only then the old one deleted. A crash between
the two renames leaves ``last.ckpt`` absent and ``.last.ckpt.old`` complete; :func:`resume_path` and
:func:`recover` treat that backup as the last checkpoint.

All ranks must call the save (``trainer.save_checkpoint`` is a collective with sharded strategies); only rank 0
renames and deletes. ``dirpath`` must be on a filesystem all nodes share.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from sfplus.disk_full import disk_full_error, is_disk_full
from sfplus.file_checks import torch_load

__all__ = [
    "AtomicCheckpoint",
    "CheckpointPathError",
    "atomic_save",
    "checkpoint_problem",
    "commit",
    "publish",
    "recover",
    "resume_candidates",
    "resume_path",
    "save_trainer_checkpoint",
]

LAST = "last.ckpt"
SHARDED_MARKER = "meta.pt"  # written last by rank 0 into a Lightning distributed checkpoint directory


class CheckpointPathError(ValueError):
    """A checkpoint folder or name is unusable (names the path and the reason)."""


# ---- file-system primitives ----------------------------------------------------------------------------------


def partial_path(final: str | os.PathLike) -> Path:
    """Where a checkpoint destined for ``final`` is written first (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def backup_path(final: str | os.PathLike) -> Path:
    """Where the previous ``final`` directory waits while the new one is renamed into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.old")


def remove(path: str | os.PathLike) -> None:
    """Remove a file, a symlink or a directory tree; nothing if absent."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    # A rename is atomic against a crashed process; flushing the data first also covers a crashed node.
    # Directories (sharded checkpoints) are not flushed file by file: their shards are written by other ranks.
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint that can be loaded: a non-empty file, or a directory holding Lightning's ``meta.pt``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size > 0
    return path.is_dir() and (path / SHARDED_MARKER).is_file()


def commit(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a complete checkpoint ``tmp`` (file or directory) to ``final``, replacing what is there.

    A file replaces ``final`` with one atomic ``os.replace``. A directory (or a file replacing a directory) goes
    through :func:`backup_path`: old → backup, new → final, then the backup is deleted, so at every instant either
    ``final`` or its backup is a complete checkpoint.
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.exists():
        raise CheckpointPathError(f"cannot commit {tmp} to {final}: the save produced nothing at {tmp}")
    if tmp.is_file():
        _fsync(tmp)
    if tmp.is_file() and not (final.is_dir() and not final.is_symlink()):
        os.replace(tmp, final)
    else:
        old = backup_path(final)
        if final.exists() or final.is_symlink():
            remove(old)  # a stale backup of an earlier, completed replacement (final is complete)
            os.replace(final, old)
        # (final missing: an earlier commit died between the renames and `old` is the only complete copy; it
        # stays until the new checkpoint is in place.)
        os.replace(tmp, final)
        remove(old)
    _fsync(final.parent)
    return final


def recover(final: str | os.PathLike) -> Path | None:
    """Finish an interrupted :func:`commit` and drop an unfinished save; returns the valid checkpoint, if any.

    * ``final`` missing but its backup complete (crash between the two renames): the backup is renamed back;
    * a leftover ``.partial`` (crash while saving) is deleted: it was never complete.

    Rank 0 only (it changes the folder).
    """
    final = Path(final)
    old = backup_path(final)
    if not final.exists() and is_complete(old):
        try:
            os.replace(old, final)
        except FileNotFoundError:  # another process (a rank resolving --ckpt_path last) renamed it first
            pass
    elif old.exists() and is_complete(final):
        remove(old)
    remove(partial_path(final))
    return final if is_complete(final) else None


def atomic_save(
    save: Callable[[Path], Any],
    final: str | os.PathLike,
    *,
    is_rank_zero: bool = True,
    barrier: Callable[[], None] = lambda: None,
    needed: Callable[[], int | None] | None = None,
) -> Path:
    """Write a checkpoint with ``save(tmp_path)`` and rename it to ``final`` only once it is complete.

    ``save`` may create a file or a directory at the path it is given. On every rank the same ``tmp_path`` is used
    (the collective save of sharded strategies writes one directory together). Sequence: rank 0 clears stale
    leftovers → barrier → every rank calls ``save`` → barrier → rank 0 commits → barrier.

    If ``save`` raises, the partial output is removed (rank 0) and the exception propagates; ``final`` is untouched.
    A save that ran out of space is raised as :class:`~sfplus.disk_full.DiskFullError` naming ``final``, the size
    ``needed()`` estimates and the free space.
    """
    final = Path(final)
    tmp = partial_path(final)
    if is_rank_zero:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover(final)
    barrier()
    try:
        save(tmp)
    except BaseException as err:
        written = _size_on_disk(tmp)
        if is_rank_zero:
            remove(tmp)
        if is_disk_full(err):
            raise disk_full_error(final, needed() if needed else None, written) from err
        raise
    barrier()  # every rank has written its shard
    if is_rank_zero:
        commit(tmp, final)
    barrier()  # nobody reads or re-saves before the rename is done
    return final


def _size_on_disk(path: Path) -> int | None:
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def estimate_checkpoint_bytes(trainer: L.Trainer) -> int:
    """Bytes of the tensors a checkpoint of ``trainer`` holds: the module's state (frozen nets excluded, as in the
    checkpoint) and the optimizers' states. Global sizes for sharded tensors."""
    def nbytes(values) -> int:
        return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))

    total = nbytes(trainer.lightning_module.state_dict().values())
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            total += nbytes(state.values())
    return total


def _link_or_copy(src: Path, dst: Path) -> None:
    # Hard links make `last.ckpt` a second name for the periodic checkpoint: no second multi-GB write, and
    # deleting the periodic name later leaves `last.ckpt` intact. Files are never modified in place (every save is
    # a new file renamed over the old name), so sharing inodes is safe.
    if src.is_dir():
        dst.mkdir()
        for entry in src.iterdir():
            _link_or_copy(entry, dst / entry.name)
        return
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this filesystem
        shutil.copy2(src, dst)


def publish(src: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make ``final`` (e.g. ``last.ckpt``) a complete copy of checkpoint ``src`` (hard links where possible),
    through the same temp-name + rename as :func:`atomic_save`. Rank 0 only."""
    src, final = Path(src), Path(final)
    if not is_complete(src):
        raise CheckpointPathError(f"cannot publish {src} as {final}: {src} is not a complete checkpoint")
    recover(final)
    tmp = partial_path(final)
    try:
        _link_or_copy(src, tmp)
    except BaseException:
        remove(tmp)
        raise
    return commit(tmp, final)


def save_trainer_checkpoint(trainer: L.Trainer, final: str | os.PathLike) -> Path:
    """``trainer.save_checkpoint`` through :func:`atomic_save` (collective: call on every rank)."""
    strategy = trainer.strategy
    final = Path(strategy.broadcast(str(final)))  # one path for all ranks
    return atomic_save(
        lambda tmp: trainer.save_checkpoint(tmp),  # the whole resumable state (Lightning's default)
        final,
        is_rank_zero=trainer.is_global_zero,
        barrier=lambda: strategy.barrier("sfplus.atomic_save"),
        needed=lambda: estimate_checkpoint_bytes(trainer),
    )


# ---- naming and resuming -------------------------------------------------------------------------------------


def periodic_name(counter: str, value: int) -> str:
    return f"{counter}-{value:08d}.ckpt"


def _periodic_pattern(counter: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(counter)}-(\d+)\.ckpt$")


def periodic_checkpoints(dirpath: str | os.PathLike, counter: str = "iteration") -> list[tuple[int, Path]]:
    """Complete periodic checkpoints in ``dirpath`` as ``(counter value, path)``, oldest first."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    pattern = _periodic_pattern(counter)
    found = []
    for entry in dirpath.iterdir():
        m = pattern.match(entry.name)
        if m and is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (one line naming it), or ``None`` if it loads.

    A file must load with ``torch.load(weights_only=True)`` (memory-mapped: the tensors' bytes are not read) and
    hold a dict with a ``state_dict``; a sharded directory must hold a loadable ``meta.pt`` and a non-empty
    ``.metadata``. Catches what a crash, a full disk or a bad copy leaves: empty, truncated or foreign files.
    """
    path = Path(path)
    if path.is_dir():
        meta, index = path / SHARDED_MARKER, path / ".metadata"
        if not meta.exists() and not index.exists():
            return f"checkpoint {path} is a folder but not a sharded checkpoint (no .metadata, no {SHARDED_MARKER})"
        if not index.is_file() or index.stat().st_size == 0:
            return f"sharded checkpoint {path} has no .metadata index: an unfinished save"
        target = meta
    else:
        target = path
    try:
        obj = torch_load(target, "checkpoint", CheckpointPathError)
    except CheckpointPathError as err:
        return str(err)
    if not isinstance(obj, dict) or ("state_dict" not in obj and not path.is_dir()):
        return f"checkpoint {target} is not a Lightning checkpoint (no state_dict)"
    return None


def resume_candidates(dirpath: str | os.PathLike, counter: str = "iteration") -> list[Path]:
    """Every checkpoint in ``dirpath`` a job could resume from, best first: ``last.ckpt``, its backup left by a
    crash mid-replacement, then the periodic checkpoints (``<counter>-NNNNNNNN.ckpt``) newest first. Not checked."""
    dirpath = Path(dirpath)
    if dirpath.exists() and not dirpath.is_dir():
        raise CheckpointPathError(f"checkpoint folder {dirpath} is a file, not a folder")
    found = [c for c in (dirpath / LAST, backup_path(dirpath / LAST)) if c.exists()]
    return found + [path for _, path in reversed(periodic_checkpoints(dirpath, counter))]


def resume_path(dirpath: str | os.PathLike, counter: str = "iteration",
                skipped: list[str] | None = None) -> str | None:
    """The checkpoint a (re)started job should resume from, or ``None`` when there is none (first start).

    The first of :func:`resume_candidates` that loads (:func:`checkpoint_problem`): a truncated ``last.ckpt``
    falls back to the newest intact periodic checkpoint. Each one passed over is appended to ``skipped`` (the
    reason, naming the file). Read-only: safe to call from every rank and from a shell before the job starts.
    """
    for candidate in resume_candidates(dirpath, counter):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        if skipped is not None:
            skipped.append(problem)
    return None


# ---- the callback --------------------------------------------------------------------------------------------


class AtomicCheckpoint(Checkpoint):
    """Periodic + last checkpoints on the module's own counter, written atomically.

    Being a Lightning ``Checkpoint``, it runs after the other callbacks at each batch end (so the EMA update of
    that batch is in the checkpoint), and Lightning adds no default ``ModelCheckpoint`` next to it.

    Args:
        dirpath: folder of the checkpoints (default ``<default_root_dir>/checkpoints``); give a fixed path so a
            requeued job finds them (``resume_path(dirpath)``).
        every_n_iterations: a periodic checkpoint each time ``counter`` crosses a multiple of this (None: only
            ``last.ckpt`` at the end of training).
        keep_last: periodic checkpoints kept (oldest deleted first); 0 keeps none (only ``last.ckpt``).
        save_last: maintain ``last.ckpt`` (published after every periodic save and at the end of training).
        counter: module attribute that drives the cadence (``iteration`` = critic updates in ``DistillModule``,
            updates in ``DiffusionModule``); it also names the periodic files.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_iterations: int | None = None,
        keep_last: int = 3,
        save_last: bool = True,
        counter: str = "iteration",
    ) -> None:
        if every_n_iterations is not None and every_n_iterations < 1:
            raise ValueError(f"AtomicCheckpoint.every_n_iterations must be >= 1 or None, got {every_n_iterations}")
        if keep_last < 0:
            raise ValueError(f"AtomicCheckpoint.keep_last must be >= 0, got {keep_last}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", counter):
            raise ValueError(f"AtomicCheckpoint.counter must be an attribute name, got {counter!r}")
        self._dirpath_arg = dirpath
        self.dirpath: Path | None = Path(dirpath) if dirpath else None
        self.every_n_iterations, self.keep_last = every_n_iterations, keep_last
        self.save_last, self.counter = save_last, counter
        self._last_value = 0  # counter value at the last periodic save (or at the start)
        self._last_global_step: int | None = None  # global_step of the state in last.ckpt

    @property
    def last_path(self) -> Path:
        if self.dirpath is None:
            raise RuntimeError("AtomicCheckpoint.dirpath is known only after setup")
        return self.dirpath / LAST

    # -- lifecycle --
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dirpath = self._dirpath_arg or os.path.join(trainer.default_root_dir, "checkpoints")
        self.dirpath = Path(trainer.strategy.broadcast(str(dirpath)))
        if self.dirpath.exists() and not self.dirpath.is_dir():
            raise CheckpointPathError(f"AtomicCheckpoint.dirpath {self.dirpath} is a file, not a folder")
        if trainer.is_global_zero and stage == "fit":
            self.dirpath.mkdir(parents=True, exist_ok=True)
            recover(self.last_path)
            # Saves that a crash interrupted were never renamed into place: drop them.
            for leftover in self.dirpath.glob(f".{self.counter}-*.ckpt.partial"):
                remove(leftover)
        trainer.strategy.barrier("sfplus.AtomicCheckpoint.setup")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume the restored state is already on disk: count from here.
        self._last_value = self._value(pl_module)
        self._last_global_step = trainer.global_step

    def _value(self, pl_module: L.LightningModule) -> int:
        if not hasattr(pl_module, self.counter):
            raise AttributeError(
                f"AtomicCheckpoint.counter={self.counter!r}: {type(pl_module).__name__} has no such attribute"
            )
        return int(getattr(pl_module, self.counter))

    # -- saving --
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_iterations is None:
            return
        value = self._value(pl_module)
        n = self.every_n_iterations
        if value // n > self._last_value // n:  # crossed a multiple of n (counters may stand still on some batches)
            self.save_periodic(trainer, value)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step != trainer.global_step:
            self.save_last_now(trainer)

    def save_periodic(self, trainer: L.Trainer, value: int) -> Path:
        path = save_trainer_checkpoint(trainer, self.dirpath / periodic_name(self.counter, value))
        self._last_value = value
        if trainer.is_global_zero:
            if self.save_last:
                publish(path, self.last_path)
            self._prune()
        trainer.strategy.barrier("sfplus.AtomicCheckpoint.publish")
        if self.save_last:
            self._last_global_step = trainer.global_step
        rank_zero_info(f"sfplus: saved {path}")
        return path

    def save_last_now(self, trainer: L.Trainer) -> Path:
        """Save the current state as ``last.ckpt`` (collective). Used at the end of training and on preemption."""
        path = save_trainer_checkpoint(trainer, self.last_path)
        self._last_global_step = trainer.global_step
        rank_zero_info(f"sfplus: saved {path}")
        return path

    def _prune(self) -> None:
        periodic = periodic_checkpoints(self.dirpath, self.counter)
        excess = len(periodic) - self.keep_last
        for _, path in periodic[: max(excess, 0)]:
            remove(path)


def main(argv: list[str] | None = None) -> None:
    """``python -m sfplus.callbacks.checkpointing DIR``: print the checkpoint to resume from (empty if none)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (1, 2):
        print("usage: python -m sfplus.callbacks.checkpointing CHECKPOINT_DIR [COUNTER]", file=sys.stderr)
        sys.exit(2)
    skipped: list[str] = []
    try:
        path = resume_path(*argv, skipped=skipped)
    except CheckpointPathError as err:
        print(f"sfplus: error: {err}", file=sys.stderr)
        sys.exit(2)
    for problem in skipped:  # on stderr: stdout is the path a job script reads
        print(f"sfplus: warning: skipped {problem}", file=sys.stderr)
    print(path or "")


if __name__ == "__main__":
    main()
