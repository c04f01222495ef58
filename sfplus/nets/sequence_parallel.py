"""Ulysses sequence parallelism for WanDiT (docs/parallelism.md).

The ranks of a sequence-parallel (SP) group hold the same batch and split its token sequence. The split is *within
every frame*: a video of F frames of S tokens each (S = H'·W') is cut so that rank r holds tokens
``[r·S/sp, (r+1)·S/sp)`` of every frame, i.e. local tokens [B, F·S/sp, dim], still frame-major. Splitting inside
frames rather than across them keeps everything that works per frame unchanged (the per-frame time modulation, the
head, teacher forcing's [clean frames ; noisy frames] layout, the causal block structure), works for any frame count
(21 latent frames do not divide by 2, 1560 or 3600 tokens per frame do), and balances the work exactly.

Self-attention is the only part that needs other ranks' tokens. Ulysses: each rank computes q, k, v for its tokens
and all heads, an all-to-all trades "my tokens, all heads" for "all tokens, my heads/sp heads", attention runs over
the full sequence in the global token order (so block-causal masks and KV caches index global tokens unchanged),
and a second all-to-all trades back. Cross-attention needs no communication: its queries are per token and its
keys/values (text, image) are the same on every rank. RoPE tables are those of the global grid, sliced like the
tokens.

Gradients: every collective's backward is its exact adjoint (split ↔ zero-padded, all-gather ↔ reduce-scatter,
all-to-all ↔ the reverse all-to-all). Every rank of a group computes the same loss from the gathered output, so
the distributed graph computes the gradient of sp × loss, summed over ranks; FSDP2's mean over all dp·sp ranks
of that sum is exactly the data-parallel mean of the true gradients (sfplus.parallel.parallelize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["SPGroup", "SequenceShard", "enable_sequence_parallel", "check_heads"]


@dataclass(frozen=True)
class SPGroup:
    """A sequence-parallel process group: ``size`` ranks that hold the same samples; this process is ``rank``."""

    group: object  # torch.distributed ProcessGroup
    size: int
    rank: int

    @classmethod
    def from_group(cls, group) -> SPGroup:
        return cls(group, dist.get_world_size(group), dist.get_rank(group))


def check_heads(num_heads: int, size: int) -> None:
    """Ulysses gives each rank num_heads / size heads: refuse group sizes that do not divide the head count."""
    if size < 1 or num_heads % size:
        raise ValueError(f"scale.sequence_parallel={size} must divide the model's num_heads={num_heads} "
                         "(Ulysses splits attention heads across the group)")


def enable_sequence_parallel(net: torch.nn.Module, group: SPGroup | None) -> torch.nn.Module:
    """Make a WanDiT split its sequence over ``group`` in every forward (None: turn it off)."""
    if group is not None and group.size > 1:
        check_heads(net.config.num_heads, group.size)
    else:
        group = None
    net.sequence_parallel = group
    return net


# ---------------------------------------------------------------------------------------------- collectives
class _Scatter(torch.autograd.Function):
    """Replicated x -> this rank's chunk along ``dim``; backward: the chunk's gradient zero-padded (exact adjoint)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, sp: SPGroup) -> torch.Tensor:
        ctx.dim, ctx.sp, ctx.full = dim, sp, x.shape
        return x.chunk(sp.size, dim)[sp.rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros(ctx.full)
        full.narrow(ctx.dim, ctx.sp.rank * grad.shape[ctx.dim], grad.shape[ctx.dim]).copy_(grad)
        return full, None, None


def _all_gather(x: torch.Tensor, dim: int, sp: SPGroup) -> torch.Tensor:
    out = x.new_empty((sp.size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=sp.group)
    return torch.cat(out.chunk(sp.size, 0), dim=dim) if dim else out


def _reduce_scatter(x: torch.Tensor, dim: int, sp: SPGroup) -> torch.Tensor:
    stacked = torch.cat(x.chunk(sp.size, dim), dim=0).contiguous() if dim else x.contiguous()
    out = stacked.new_empty((stacked.shape[0] // sp.size, *stacked.shape[1:]))
    dist.reduce_scatter_tensor(out, stacked, group=sp.group)
    return out


class _Gather(torch.autograd.Function):
    """Chunks along ``dim`` -> the whole tensor on every rank; backward: reduce-scatter (sum) of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, sp: SPGroup) -> torch.Tensor:
        ctx.dim, ctx.sp = dim, sp
        return _all_gather(x, dim, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.dim, ctx.sp), None, None


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, sp: SPGroup) -> torch.Tensor:
    """Cut x into sp chunks along scatter_dim, send chunk j to rank j, concatenate what arrives along gather_dim
    (rank order)."""
    send = torch.stack(x.chunk(sp.size, scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, sp: SPGroup) -> torch.Tensor:
        ctx.dims, ctx.sp = (scatter_dim, gather_dim), sp
        return _all_to_all(x, scatter_dim, gather_dim, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.sp), None, None, None


# ---------------------------------------------------------------------------------------------- one forward's split
class SequenceShard:
    """One forward's sequence split: ``group`` and the global tokens per frame S (S % group.size == 0).

    Local token tensors are [B, F·S_l, ...] (S_l = S / sp, frame-major); global ones [B, F·S, ...].
    """

    def __init__(self, group: SPGroup, tokens_per_frame: int) -> None:
        if tokens_per_frame % group.size:
            raise ValueError(f"sequence parallel over {group.size} ranks needs tokens per frame (H'·W' = "
                             f"{tokens_per_frame}) divisible by {group.size}; pick a video size or group size "
                             "that divides")
        self.group, self.tokens_per_frame = group, tokens_per_frame
        self.local_tokens_per_frame = tokens_per_frame // group.size

    def _frames(self, x: torch.Tensor, per_frame: int) -> torch.Tensor:
        """[B, F·n, ...] -> [B, F, n, ...]."""
        return x.unflatten(1, (x.shape[1] // per_frame, per_frame))

    @torch.compiler.disable  # collectives stay eager; a compiled block runs as graphs around them
    def split(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global [B, F·S, ...] (the same on every rank) -> this rank's [B, F·S_l, ...]."""
        local = _Scatter.apply(self._frames(tokens, self.tokens_per_frame), 2, self.group)
        return local.flatten(1, 2)

    def split_table(self, table: torch.Tensor) -> torch.Tensor:
        """A RoPE table [F·S, d/2] of the global tokens -> the rows of this rank's tokens [F·S_l, d/2]."""
        return self.split(table[None])[0]

    @torch.compiler.disable  # collectives stay eager; a compiled block runs as graphs around them
    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Local [B, F·S_l, ...] -> global [B, F·S, ...] on every rank."""
        full = _Gather.apply(self._frames(tokens, self.local_tokens_per_frame), 2, self.group)
        return full.flatten(1, 2)

    @torch.compiler.disable  # collectives stay eager; a compiled block runs as graphs around them
    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Ulysses in: this rank's tokens, all heads [B, F·S_l, H, d] -> all tokens (global order), H/sp heads
        [B, F·S, H/sp, d]."""
        out = _AllToAll.apply(self._frames(x, self.local_tokens_per_frame), 3, 2, self.group)
        return out.flatten(1, 2)

    @torch.compiler.disable  # collectives stay eager; a compiled block runs as graphs around them
    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Ulysses out: [B, F·S, H/sp, d] -> [B, F·S_l, H, d] (this rank's tokens, every head group)."""
        out = _AllToAll.apply(self._frames(x, self.tokens_per_frame), 2, 3, self.group)
        return out.flatten(1, 2)
