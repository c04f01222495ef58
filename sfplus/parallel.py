"""Sharding and memory savers, applied in one place (torchtitan's ``parallelize`` idea); the nets stay clean.

* :func:`parallelize` — the one caller of the three below, in the order that works: frozen dtype, compile,
  activation checkpointing, FSDP2.
* :func:`apply_activation_checkpointing` — recompute each transformer block in backward (non-reentrant, which
  the KV-cache rollout needs: the recompute never writes to the cache).
* :func:`shard_dit` — FSDP2 ``fully_shard`` per block, then the whole net, over the data-parallel mesh. Block
  inputs are NOT cast (``cast_forward_inputs=False``): the residual stream and the modulation stay fp32 as in
  official Wan, while the weights are gathered in ``param_dtype`` (bf16) and gradients reduced in fp32.
* :func:`settle_mixed_precision` — fix FSDP2's mixed-precision dtypes while the trainable nets require grad
  (before alternating updates freeze one net during the other's step).
* :func:`load_weights` — fill a (possibly sharded, possibly meta-initialised) net from a weights source, file by
  file for Wan folders, so no rank ever holds two full copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sfplus.nets.sequence_parallel import SPGroup, enable_sequence_parallel
from sfplus.weights.checkpoints import CheckpointError, check_state_dict, read_dit_state_dict
from sfplus.weights.sharded_checkpoint import is_sharded_checkpoint
from sfplus.weights.wan_folders import folder_shapes, iter_folder_shards, locate_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def apply_activation_checkpointing(net: nn.Module, context_fn=None) -> nn.Module:
    """Wrap every block of ``net.blocks`` in a non-reentrant checkpoint (state-dict keys are unchanged).

    ``context_fn``: torch.utils.checkpoint's — (forward context, recompute context), taken at each forward; a net
    whose behaviour depends on state outside its inputs (the LoRA base's active adapter, sfplus.modules.lora)
    restores that state for the recompute with it.
    """

    kwargs = {} if context_fn is None else {"context_fn": context_fn}
    for i, block in enumerate(net.blocks):
        if not hasattr(block, "_checkpoint_wrapped_module"):
            net.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)
    return net


def compile_blocks(net: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` every transformer block in place (each traces as one graph).

    Measured on one H200 (docs/performance.md): one 1.3B step 0.73 s → 0.54 s, one 14B step 3.73 s → 2.97 s,
    outputs within 6e-4 relative of eager. Opt-in (``scale: {compile: true}``): compiling costs ~15-30 s; the
    causal path's growing KV-cache lengths recompile once, then run dynamic.
    """
    # All blocks share one code object, and each call type (full, KV-cache step, the cache's first call, teacher
    # forcing) is its own graph: the default limit of 8 graphs per code object would silently fall back to eager.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    for block in net.blocks:
        block.compile(**compile_kwargs)
    return net


def shard_dit(
    net: nn.Module,
    mesh,
    *,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2-shard a WanDiT: each block, then the root (embeddings, head)."""

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in net.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return net


def settle_mixed_precision(net: nn.Module) -> None:
    """Run FSDP2's one-time initialisation of ``net`` now, while its trainable parameters require grad.

    FSDP2 decides a shard group's gradient dtypes (``orig_dtype``, ``reduce_dtype``) once, at the group's first
    forward, from the parameters that require grad at that moment. With alternating generator/critic updates the
    critic's first forward happens inside the generator update, where ``toggled_optimizer`` has frozen it: FSDP2
    then records "nothing trainable", reduces the critic's later gradients in bf16 and fails to assign them to the
    fp32 master weights ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float").
    Initialising every sharded net up front, in its training state, fixes the dtypes for good. Call it after the
    weights are loaded (FSDP2 refuses meta tensors here). Idempotent; a no-op for unsharded nets.
    """
    get_state = getattr(net, "_get_fsdp_state", None)
    if get_state is None:
        return
    # FSDPState._lazy_init is what the root's first forward calls (torch >= 2.4); there is no public alias.
    get_state()._lazy_init()


def parallelize(
    trainable: list[nn.Module], frozen: list[nn.Module], ema: list[nn.Module], mesh, *,
    activation_checkpointing: bool = False, compile: bool = False, param_dtype: str = "bf16",
    frozen_dtype: str | None = None, sequence_parallel=None, checkpoint_context=None,
) -> None:
    """Lay a recipe's nets out for training: frozen nets (the teacher) and EMA copies are frozen and put in eval
    mode, the teacher stored in ``frozen_dtype``; then compile, activation checkpointing (trained DiTs only) and
    FSDP2 over ``mesh`` (None or one device: no sharding). ``sequence_parallel``: a process group over which every
    DiT splits its tokens (Ulysses, sfplus.nets.sequence_parallel); ``mesh`` then spans all dp·sp ranks, and FSDP2's
    gradient mean over them is the data-parallel mean (see that module's docstring).

    ``checkpoint_context``: the ``context_fn`` of the checkpoint wrappers (:func:`apply_activation_checkpointing`).
    Compiling comes before the checkpoint wrappers: a compiled block inside a checkpoint recomputes correctly,
    while compiling the wrapper (the checkpoint traced by dynamo) fails in backward under autocast.
    """
    for net in [*frozen, *ema]:
        net.requires_grad_(False).eval()
    if frozen_dtype:
        for net in frozen:
            net.to(DTYPES[frozen_dtype])
    dits = [net for net in [*trainable, *frozen, *ema] if hasattr(net, "blocks")]
    if sequence_parallel is not None:
        group = SPGroup.from_group(sequence_parallel)
        for net in dits:
            enable_sequence_parallel(net, group)
    if compile:
        for net in dits:
            compile_blocks(net)
    if activation_checkpointing:
        for net in trainable:
            if hasattr(net, "blocks"):  # the DiTs; a small head (the GAN discriminator) has nothing to recompute
                apply_activation_checkpointing(net, checkpoint_context)
    if mesh is None or mesh.size() == 1:
        # Nothing to shard on one device: the trainer's precision (bf16-mixed autocast, set in every shipped
        # config) gives the same bf16 compute with fp32 masters, without FSDP's copies.
        return
    for net in [*trainable, *frozen, *ema]:
        if hasattr(net, "blocks"):
            shard_dit(net, mesh, param_dtype=DTYPES[param_dtype])
        else:  # small heads (the GAN discriminator): one shard unit
            shard_module(net, mesh, param_dtype=DTYPES[param_dtype])


def shard_module(net: nn.Module, mesh, *, param_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """FSDP2-shard a small net as one unit (weights gathered in ``param_dtype``, gradients reduced in fp32)."""

    fully_shard(net, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    return net


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this rank holds (its shard of a DTensor; the tensor's data when unsharded), for in-place
    arithmetic on local shards (EMA, weight copies)."""
    return p.to_local() if hasattr(p, "to_local") else p.data


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy parameters between two identically built (and identically sharded) nets, local shards only."""
    for d, p in zip(dst.parameters(), src.parameters()):
        local_tensor(d).copy_(local_tensor(p))


def is_sharded(net: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in net.parameters())


def _set_state(net: nn.Module, sd: dict[str, torch.Tensor], strict: bool) -> None:
    if is_sharded(net):
        set_model_state_dict(net, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        own = net.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)


def load_weights(net: nn.Module, source: str | os.PathLike | dict[str, torch.Tensor], which: str = "ema") -> nn.Module:
    """Load weights into ``net`` strictly: keys and shapes are checked first, then copied file by file.

    ``source`` is a path that :func:`sfplus.weights.checkpoints.read_dit_state_dict` understands (Wan/diffusers
    folders are streamed file by file), or a state dict. Works for sharded (DTensor) and plain nets.
    """

    # check_state_dict compares with net.state_dict() shapes, which are the global shapes for DTensors.

    own_keys = set(net.state_dict().keys())
    if isinstance(source, dict) or not os.path.isdir(source) or is_sharded_checkpoint(Path(source)):
        sd = source if isinstance(source, dict) else read_dit_state_dict(source, which)
        check_state_dict(net, sd, str(source) if not isinstance(source, dict) else "state dict")
        _set_state(net, sd, strict=True)
        return net

    files = locate_weights(source)
    shapes = folder_shapes(files)
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    check_state_dict(net, fake, str(source))
    seen: set[str] = set()
    for shard in iter_folder_shards(files):
        _set_state(net, shard, strict=False)
        seen.update(shard)
    if seen != own_keys:
        raise CheckpointError(f"weights in {source} left {sorted(own_keys - seen)[:8]} unloaded")
    return net


def close_process_group() -> None:
    """Tear the default process group down in step on every rank after a successful run.

    Lightning leaves the group alive at exit; with gloo, a rank that reaches interpreter shutdown while a peer is
    still writing its last checkpoint can abort in the C++ destructor ("terminate called without an active
    exception"), turning a finished job into a failed one. A barrier, then an explicit destroy, avoids that race.
    """

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
