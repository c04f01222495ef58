"""What ``--ckpt_path`` means for an sfplus run, decided from the parsed config before anything is built.

Lightning resolves ``ckpt_path="last"`` from its own ``ModelCheckpoint``; sfplus saves with
:class:`~sfplus.callbacks.AtomicCheckpoint` and :class:`~sfplus.callbacks.Preemption`, so Lightning finds nothing,
warns once, starts from scratch and later overwrites the run's ``last.ckpt``. Here:

* ``last`` (and ``hpc``: sfplus's preemption handler saves ``last.ckpt`` where Lightning's SLURM handler would save
  ``hpc_ckpt_<n>.ckpt``) become the checkpoint :func:`~sfplus.callbacks.checkpointing.resume_path` picks in the
  run's checkpoint folders — the newest one that loads — so the run resumes exactly as with that explicit path
  (LightningCLI also reloads the checkpoint's hyper-parameters from it). No checkpoint there: an error, never a
  silent fresh start.
* an explicit path is checked at the door (it must load with ``weights_only=True``).
* no ``--ckpt_path`` on ``fit`` while a checkpoint folder of the run already holds checkpoints: refused, unless the
  user asks to start over (``--overwrite_checkpoints true``), in which case the old checkpoints are deleted when
  training starts (:class:`DiscardOldCheckpoints`): not before, so a run that fails to start (a bad teacher file)
  loses nothing, and not never, since old periodic checkpoints with higher numbers would outlive the new run's and
  be picked by ``--ckpt_path last``.

The folders are those the callbacks will use: ``AtomicCheckpoint.dirpath`` / ``Preemption.dirpath``, else
``<default_root_dir>/checkpoints`` (also where the preemption handler sfplus adds by default saves), plus an
explicit ``ModelCheckpoint.dirpath``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sfplus.callbacks import AtomicCheckpoint, Preemption
from sfplus.callbacks.checkpointing import (
    LAST,
    CheckpointPathError,
    backup_path,
    checkpoint_problem,
    partial_path,
    periodic_checkpoints,
    recover,
    remove,
    resume_candidates,
    resume_path,
)

__all__ = [
    "CheckpointFolder",
    "DiscardOldCheckpoints",
    "ResumeError",
    "checkpoint_folders",
    "discard_checkpoints",
    "resolve_ckpt_path",
]

RESUME_KEYWORDS = ("last", "hpc")


class ResumeError(ValueError):
    """``--ckpt_path`` cannot be honoured, or a fresh ``fit`` would overwrite a run (names the folder or file)."""


@dataclass(frozen=True)
class CheckpointFolder:
    """A folder a run saves checkpoints into, and the counter that names its periodic checkpoints."""

    path: Path
    counter: str = "iteration"


def _class(class_path: str | None) -> type | None:
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _is(entry: Any, base: type) -> bool:
    cls = _class(getattr(entry, "class_path", None)) if not isinstance(entry, base) else type(entry)
    return isinstance(cls, type) and issubclass(cls, base)


def _arg(entry: Any, name: str) -> Any:
    if hasattr(entry, "class_path"):  # a parsed config entry: Namespace(class_path=..., init_args=...)
        return getattr(getattr(entry, "init_args", None) or {}, name, None)
    return getattr(entry, f"_{name}_arg", getattr(entry, name, None))  # an instance


def checkpoint_folders(trainer_config: Any, preemption: bool = True) -> list[CheckpointFolder]:
    """The checkpoint folders of a run, from the parsed ``trainer`` config (``Namespace`` or dict)."""


    get = trainer_config.get if hasattr(trainer_config, "get") else lambda k, d=None: getattr(trainer_config, k, d)
    root = Path(get("default_root_dir", None) or os.getcwd())
    default = root / "checkpoints"
    callbacks = get("callbacks", None) or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    folders: list[CheckpointFolder] = []
    atomic = [cb for cb in callbacks if _is(cb, AtomicCheckpoint)]
    for cb in atomic:
        folders.append(CheckpointFolder(Path(_arg(cb, "dirpath") or default), _arg(cb, "counter") or "iteration"))
    listed_preemption = [cb for cb in callbacks if _is(cb, Preemption)]
    for cb in listed_preemption:
        if _arg(cb, "dirpath"):
            folders.append(CheckpointFolder(Path(_arg(cb, "dirpath"))))
        elif not atomic:
            folders.append(CheckpointFolder(default))
    if preemption and not listed_preemption and not atomic:  # the handler the CLI adds saves here
        folders.append(CheckpointFolder(default))
    for cb in callbacks:
        if _is(cb, ModelCheckpoint) and _arg(cb, "dirpath"):
            folders.append(CheckpointFolder(Path(_arg(cb, "dirpath"))))
    unique: dict[tuple[Path, str], CheckpointFolder] = {}
    for folder in folders:
        unique.setdefault((folder.path.absolute(), folder.counter), folder)
    return list(unique.values())


def _existing(folder: CheckpointFolder) -> list[Path]:
    """Every checkpoint-looking entry in ``folder`` (complete or not): what a fresh run would overwrite."""
    try:
        found = resume_candidates(folder.path, folder.counter)
    except CheckpointPathError as err:
        raise ResumeError(str(err)) from None
    return found


def _resume(keyword: str, folders: list[CheckpointFolder]) -> str:
    if not folders:
        raise ResumeError(f"--ckpt_path {keyword}: this config saves no checkpoints (no AtomicCheckpoint or "
                          f"Preemption callback, and --preemption false): give the checkpoint's path")
    chosen: list[str] = []
    problems: list[str] = []
    for folder in folders:
        try:
            path = resume_path(folder.path, folder.counter, skipped=problems)
        except CheckpointPathError as err:
            raise ResumeError(f"--ckpt_path {keyword}: {err}") from None
        if path is not None:
            chosen.append(path)
    where = " or ".join(str(f.path) for f in folders)
    if not chosen:
        if problems:
            raise ResumeError(f"--ckpt_path {keyword}: no checkpoint in {where} loads; the newest: {problems[0]}")
        raise ResumeError(f"--ckpt_path {keyword}: no checkpoint to resume in {where} (a first run: leave "
                          f"--ckpt_path out)")
    for problem in problems:
        print(f"sfplus: warning: --ckpt_path {keyword}: skipped {problem}", file=sys.stderr, flush=True)
    path = Path(max(chosen, key=lambda p: os.stat(p).st_mtime_ns))
    if path.name == backup_path(path.with_name(LAST)).name:
        # A crash between the two renames of a replacement left only the backup; AtomicCheckpoint.setup renames it
        # back before Lightning restores, so point at the name it will have.
        recover(path.with_name(LAST))
        path = path.with_name(LAST)
    return str(path)


def resolve_ckpt_path(subcommand: str, ckpt_path: Any, folders: list[CheckpointFolder],
                      overwrite: bool = False) -> Any:
    """The checkpoint ``subcommand`` should load, given the user's ``--ckpt_path`` (see the module docstring).

    Returns the path to hand to Lightning (``None`` for a fresh start); raises :class:`ResumeError` otherwise.
    """
    if isinstance(ckpt_path, str) and ckpt_path in RESUME_KEYWORDS:
        return _resume(ckpt_path, folders)
    if ckpt_path is None or ckpt_path == "":
        if subcommand == "fit" and not overwrite:
            for folder in folders:
                found = _existing(folder)
                if found:
                    names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
                    raise ResumeError(
                        f"{folder.path} already holds checkpoints of an earlier run ({names}): resume it with "
                        f"--ckpt_path last, or start over with --overwrite_checkpoints true (deletes them)")
        return None
    if isinstance(ckpt_path, (str, os.PathLike)) and ckpt_path != "best" and "://" not in str(ckpt_path):
        problem = checkpoint_problem(ckpt_path)
        if problem is not None:
            raise ResumeError(f"--ckpt_path: {problem}")
    return ckpt_path


def discard_checkpoints(folders: list[CheckpointFolder]) -> list[Path]:
    """Delete the sfplus checkpoints in ``folders`` (``--overwrite_checkpoints true``); returns what went.

    Only sfplus's own names (``last.ckpt``, its backup and partial, ``<counter>-N.ckpt`` and their partials):
    other files a user keeps there are left alone. Rank 0 only.
    """
    gone: list[Path] = []
    for folder in folders:
        if not folder.path.is_dir():
            continue
        last = folder.path / LAST
        names = [last, backup_path(last), partial_path(last)]
        names += [p for _, p in periodic_checkpoints(folder.path, folder.counter)]
        names += list(folder.path.glob(f".{folder.counter}-*.ckpt.partial"))
        names += [p for p in folder.path.glob(f"{folder.counter}-*.ckpt") if p not in names]
        for path in names:
            if path.exists() or path.is_symlink():
                remove(path)
                gone.append(path)
    return gone


class DiscardOldCheckpoints(L.Callback):
    """Deletes an earlier run's checkpoints in ``folders`` when training starts (``--overwrite_checkpoints true``).

    ``on_train_start`` comes after the model is built and the teacher loaded, before the first save. Rank 0
    deletes; every rank waits for it.
    """

    def __init__(self, folders: list[CheckpointFolder]) -> None:
        self.folders = list(folders)
        self.deleted: list[Path] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.deleted = discard_checkpoints(self.folders)
            for path in self.deleted:
                print(f"sfplus: --overwrite_checkpoints: deleted {path}", file=sys.stderr)
        trainer.strategy.barrier("sfplus.DiscardOldCheckpoints")
