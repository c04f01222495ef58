"""What goes wrong at the command line, as one ``sfplus: error:`` line that says which key, file or folder.

* :func:`summarize_parse_error`: jsonargparse explains a bad key or value through nested union alternatives
  ("Does not validate against any of the Union subtypes ... Given value type ..."); the line that matters is deep
  inside. It becomes ``--model.init_args.sample_steps: Expected a <class 'int'>. Got value: abc``.
* :func:`check_config_files`: every YAML file on the command line is read before jsonargparse sees it, so a syntax
  error names the file, line and column (jsonargparse reports ``in "<unicode string>"``).
* :func:`check_output_folders`: the folders a run writes (root, logs, checkpoints, videos) must be creatable: a
  folder below a regular file, or under a read-only parent, is refused before any model is built.
* :func:`os_error_message`: an ``OSError`` that still escapes (the disk filled mid-run, a folder removed) in words.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

from sfplus.disk_full import free_bytes, human_bytes
from sfplus.file_checks import DamagedFileError, load_yaml

__all__ = [
    "OutputFolderError",
    "one_line",
    "check_config_files",
    "check_output_folders",
    "folder_problem",
    "os_error_message",
    "summarize_parse_error",
]

CONFIG_FLAGS = ("--config", "-c")
_YAML_SUFFIXES = (".yaml", ".yml")
# Keys of callbacks and loggers that name folders they write into.
_FOLDER_KEYS = ("dirpath", "output_dir", "save_dir")


class OutputFolderError(ValueError):
    """A folder the run must write cannot be created or written (names it and the reason)."""


# ---- parse errors --------------------------------------------------------------------------------------------

_NOISE = re.compile(r"^(- )?(Expected a <class 'NoneType'>|Given value type:|Given value:|Subtypes:|Errors:|"
                    r"Does not validate against any of the Union subtypes)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


#: Flat recipe arguments of earlier sfplus versions and where their settings live now (typed groups).
MOVED_ARGUMENTS = {
    "denoising_steps": "schedule.steps", "warp_denoising_steps": "schedule.warp", "timestep_shift": "schedule.shift",
    "min_score_timestep": "score_timesteps.min", "ts_schedule": "score_timesteps.above_exit_step",
    "ts_schedule_max": "score_timesteps.below_exit_step",
    "generator_lr": "generator_optimizer.lr", "critic_lr": "critic_optimizer.lr",
    "critic_betas": "critic_optimizer.betas", "max_grad_norm_generator": "generator_optimizer.max_grad_norm",
    "max_grad_norm_critic": "critic_optimizer.max_grad_norm",
    "lr": "optimizer.lr (DistillModule: generator_optimizer.lr / critic_optimizer.lr)",
    "betas": "optimizer.betas (DistillModule: generator_optimizer.betas / critic_optimizer.betas)",
    "weight_decay": "optimizer.weight_decay (DistillModule: generator_optimizer / critic_optimizer)",
    "max_grad_norm": "optimizer.max_grad_norm",
    "generator_type": "causal: {frames_per_block: N} for a causal generator, nothing for a bidirectional one",
    "frames_per_block": "causal.frames_per_block", "independent_first_frame": "causal.independent_first_frame",
    "local_window_frames": "causal.local_window_frames", "sink_frames": "causal.sink_frames",
}


def summarize_parse_error(message: str) -> str:
    """The one line of a jsonargparse error that says what is wrong, prefixed by the command-line key."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    section = re.match(r'^Parser key "([^"]+)":', lines[0].strip())
    key = section.group(1) if section else None
    for i, line in enumerate(lines):
        problem = re.search(r"Problem with given class_path '([^']+)':", line)
        if not problem:
            continue
        depth = _indent(line)
        body = []
        for inner in lines[i + 1 :]:
            if _indent(inner) <= depth:
                break
            if not _NOISE.match(inner.strip()):
                body.append(inner.strip())
        if not body:
            break
        inner_key = re.match(r'^Parser key "([^"]+)":\s*(.*)$', body[0])
        if inner_key:
            detail = inner_key.group(2) or (body[1] if len(body) > 1 else "invalid value")
            full = f"{key}.init_args.{inner_key.group(1)}" if key else inner_key.group(1)
            return f"--{full}: {detail}"
        unknown = re.match(r"^Option '([^']+)' is not accepted", body[0])
        if unknown:
            where = f"--{key}.init_args.{unknown.group(1)}" if key else unknown.group(1)
            moved = MOVED_ARGUMENTS.get(unknown.group(1))
            hint = f" (now {moved})" if moved else ""
            return f"{where}: {problem.group(1)} has no argument {unknown.group(1)!r}{hint}"
        return f"--{key}: {body[0]}" if key else body[0]
    first = lines[0].strip()
    if key and len(lines) > 1 and first.endswith(":"):
        useful = [ln.strip() for ln in lines[1:] if not _NOISE.match(ln.strip())]
        if useful:
            return f"--{key}: {useful[0]}"
    return first


# ---- config files --------------------------------------------------------------------------------------------


def _config_values(argv: list[str]) -> list[tuple[str, bool]]:
    """(value, named by --config) of every command-line value that is a YAML config file."""
    found: list[tuple[str, bool]] = []
    for i, arg in enumerate(argv):
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            found.append((argv[i + 1], True))
        elif arg.startswith("--config="):
            found.append((arg.split("=", 1)[1], True))
        elif i > 0 and argv[i - 1] not in CONFIG_FLAGS and arg.endswith(_YAML_SUFFIXES) and Path(arg).is_file():
            found.append((arg, False))  # a group given as a file, e.g. --model model.yaml
    return found


def check_config_files(argv: list[str]) -> None:
    """Read every YAML config on the command line; a missing, unreadable or invalid one is one error naming it."""
    for value, is_config in _config_values(argv):
        if not is_config and not value.endswith(_YAML_SUFFIXES):
            continue
        if is_config and not value.endswith(_YAML_SUFFIXES) and not Path(value).exists():
            continue  # jsonargparse also accepts an inline YAML/JSON string after --config
        data = load_yaml(value, "config")
        if is_config and data is None:
            raise DamagedFileError(f"config {value} is empty")
        if is_config and not isinstance(data, dict):
            raise DamagedFileError(f"config {value} holds a YAML {type(data).__name__}, not a mapping of keys")


# ---- output folders ------------------------------------------------------------------------------------------


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used as a folder to write into (one line), or ``None``."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            return f"{path} is a file, not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else f"folder {path} is not writable"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create the folder {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create the folder {path}: {parent} is not writable"
    return None


def _entries(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def output_folders(trainer_config: Any) -> list[str]:
    """Folders the run will write, from the parsed ``trainer`` config: root dir, loggers', callbacks'."""
    get = trainer_config.get if hasattr(trainer_config, "get") else lambda k, d=None: getattr(trainer_config, k, d)
    folders = [get("default_root_dir", None)]
    for entry in _entries(get("logger", None)) + _entries(get("callbacks", None)):
        init_args = getattr(entry, "init_args", None) if hasattr(entry, "class_path") else entry
        folders += [getattr(init_args, key, None) for key in _FOLDER_KEYS]
    return [str(f) for f in folders if isinstance(f, (str, os.PathLike)) and str(f) and "://" not in str(f)]


def check_output_folders(trainer_config: Any) -> None:
    """Raise :class:`OutputFolderError` for the first output folder of the run that cannot be written."""
    for folder in output_folders(trainer_config):
        problem = folder_problem(folder)
        if problem is not None:
            raise OutputFolderError(problem)


# ---- OSError ------------------------------------------------------------------------------------------------


def os_error_message(err: OSError) -> str | None:
    """A one-line account of an ``OSError`` about a path the run writes or reads, or ``None`` for other errors."""
    name = err.filename
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        where = f" writing {name}" if name else ""
        free = f" ({human_bytes(free_bytes(name))} free there)" if name else ""
        return f"no space left on the device{where}{free}: {err.strerror or err}"
    if name is None:
        return None
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return folder_problem(name) or f"{name}: {err.strerror}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read {name}: {err.strerror}"
    if err.errno == errno.ENOENT:
        return f"{name} does not exist"
    if err.errno == errno.EISDIR:
        return f"{name} is a folder, not a file"
    return None


def one_line(err: BaseException) -> str:
    """The message of a user-input error as one line: an error re-raised from a DataLoader worker carries the
    worker's whole traceback in its message; its last line is the original message."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)
    return text
