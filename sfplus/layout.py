"""Where this process sits in the (data-parallel × sequence-parallel) layout of a run (docs/parallelism.md).

The ranks of one sequence-parallel group hold the same samples and split their tokens, so data, noise and
prediction outputs are distributed over the *data-parallel* ranks only. Lightning's ``ModelParallelStrategy`` builds
the 2-D device mesh ``("data_parallel", "tensor_parallel")``; sfplus uses its second dimension as the
sequence-parallel group (``scale.sequence_parallel`` must equal ``tensor_parallel_size``): Lightning then already
counts data replicas as the data-parallel dimension (``distributed_sampler_kwargs``), and sharded checkpoints,
which save per rank, need nothing new.

The recipe module records the layout when it lays its nets out (:meth:`RecipeModule.prepare_nets`); the batch
samplers, which are built without the module, read it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Layout", "set_layout", "get_layout", "data_rank_and_world", "mesh_layout"]


@dataclass(frozen=True)
class Layout:
    """data_rank of data_world data-parallel ranks; sp_rank of sp_size in this rank's sequence-parallel group."""

    data_rank: int
    data_world: int
    sp_rank: int = 0
    sp_size: int = 1


_layout: Layout | None = None


def set_layout(layout: Layout | None) -> None:
    """Record this process's layout (None: plain data parallelism over every rank of torch.distributed)."""
    global _layout
    _layout = layout


def get_layout() -> Layout | None:
    return _layout


def data_rank_and_world() -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size) of this process: the split of every batch and prompt list."""
    if _layout is not None:
        return _layout.data_rank, _layout.data_world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def mesh_layout(mesh, sequence_parallel: int):
    """Check a ModelParallelStrategy mesh against ``scale.sequence_parallel`` and split it.

    Returns (mesh to shard weights over, sequence-parallel process group or None, Layout or None). With sequence
    parallelism the weights are sharded over all dp·sp ranks (the flattened mesh): every rank holds 1/(dp·sp) of them.
    """
    names = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if sequence_parallel > 1 and "tensor_parallel" not in names:
        raise ValueError(f"scale.sequence_parallel={sequence_parallel} needs trainer.strategy ModelParallelStrategy "
                         f"with tensor_parallel_size={sequence_parallel} (its second mesh dimension is the "
                         "sequence-parallel group)")
    if tp != sequence_parallel:
        raise ValueError(f"ModelParallelStrategy has tensor_parallel_size={tp} but scale.sequence_parallel="
                         f"{sequence_parallel}: sfplus uses the tensor-parallel mesh dimension as the "
                         "sequence-parallel group, set both to the same size")
    if sequence_parallel == 1:
        shard = mesh["data_parallel"] if "data_parallel" in names else mesh
        return shard, None, None
    dp, sp = mesh["data_parallel"], mesh["tensor_parallel"]
    layout = Layout(dp.get_local_rank(), dp.size(), sp.get_local_rank(), sp.size())
    # FSDP2 over every rank; private but stable since torch 2.5 (a fresh 1-D mesh would open another group).
    return mesh._flatten("data_sequence"), sp.get_group(), layout
