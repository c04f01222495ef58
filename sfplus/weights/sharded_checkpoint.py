"""Reading DiT weights out of a sharded Lightning checkpoint (a ``torch.distributed.checkpoint`` directory:
``.metadata`` + ``*.distcp`` + Lightning's ``meta.pt``), in one process, without a process group.

This is what ``ModelParallelStrategy`` writes as ``last.ckpt``; recipes that start from another run's checkpoint
(Self-Forcing from the ODE initialisation) and ``sfplus export`` read it here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from sfplus.weights.state_dicts import MODULE_PREFIXES, CheckpointError, clean_key

LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint
_DCP_CONTAINERS = ("state_dict.", "model.")  # ModelParallelStrategy / FSDPStrategy top-level names


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a ``torch.distributed.checkpoint`` directory (a sharded Lightning checkpoint)."""
    return path.is_dir() and (path / ".metadata").is_file()


def read_sharded_checkpoint(path: Path, which: str) -> dict[str, torch.Tensor]:
    """Only the DiT tensors of a ``torch.distributed.checkpoint`` directory (no process group needed).

    Reads the chosen sub-module alone: a training checkpoint also holds the other copy of the generator, the critic
    and the optimizer states (several times the generator), which a full consolidation would pull into memory.
    """

    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except Exception as err:
        raise CheckpointError(f"cannot read the distributed checkpoint {path}: {err}") from None
    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    container = next((c for c in _DCP_CONTAINERS if any(k.startswith(c) for k in tensors)), "")
    if container == "model." and not (path / LIGHTNING_META).is_file():
        container = ""  # not Lightning's FSDP layout: "model." may be the DiT prefix itself
    names = {k: clean_key(k[len(container):]) for k in tensors if k.startswith(container)}
    for prefix in MODULE_PREFIXES[which]:
        chosen = {raw: name[len(prefix):] for raw, name in names.items() if name.startswith(prefix)}
        if chosen:
            break
    else:
        chosen = names
    if not chosen:
        raise CheckpointError(f"distributed checkpoint {path} holds no tensors")
    buffers = {raw: torch.empty(tuple(tensors[raw].size), dtype=tensors[raw].properties.dtype) for raw in chosen}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(buffers, storage_reader=reader, no_dist=True)
    return {chosen[raw]: t for raw, t in buffers.items()}
