"""Per-GPU memory planner for sfplus recipes: will it fit, and what to change if not.

    sfplus plan --generator wan2.1-t2v-14b --gpus 64 --gpu_memory_gib 80
    python -m sfplus.plan --generator wan2.1-t2v-1.3b --critic wan2.1-t2v-1.3b --teacher wan2.1-t2v-14b --gpus 8

An estimate from arithmetic, not a measurement. Every term, per GPU, in bytes (P = parameter count, from the
preset built on the meta device; S = GPUs the states are sharded over, FSDP2 ``fully_shard`` per block and per net):

* trainable nets (generator + critic): master weights ``P·m/S``, gradients ``P·m/S``, AdamW ``exp_avg`` +
  ``exp_avg_sq`` ``2·P·m/S`` (m = 4 for fp32 master weights, 2 for bf16; optimizer states take the master dtype);
* EMA of the generator: ``P_gen·4/S`` (kept in fp32: bf16 EMA updates round to zero);
* frozen teacher: ``P_teacher·t/S`` (t = 2 for bf16);
* FSDP working set (S > 1), largest net: all-gathered bf16 weights of the root unit (embeddings, head: kept
  gathered through forward and backward) and of two blocks (current + prefetched), ``2·(P_root + 2·P_block)``, plus
  one block's unsharded gradients in bf16 and their fp32 reduce-scatter copy, ``6·P_block`` (trainable nets only);
* frozen encoders, replicated on every GPU unless offloaded: UMT5-XXL 5.68 B params in bf16, the Wan VAE
  0.127 B in fp32, and for I2V CLIP ViT-H 0.63 B in fp16;
* activations (below) and a fixed ``overhead_gib`` (CUDA context, NCCL buffers, allocator fragmentation).

Activations, from the structure of ``sfplus.nets.wan.WanBlock`` (residual stream in fp32, norms and modulation
in fp32, matmul inputs in bf16, attention through SDPA/flash so no L² term; d = dim, f = ffn_dim, N = video tokens
per sample = F·(H/2)·(W/2) for patch (1, 2, 2), T = text tokens (512) + image tokens (257 for I2V), L = blocks,
B = per-GPU batch). Tensors autograd keeps per token per block, in bytes:

    norm1 input x 4d, norm1 output 4d, bf16 input of q/k/v 2d, q and k (fp32 RMSNorm input 4d + bf16 normed 2d
    + bf16 roped 2d) 2·8d, v 2d, attention output 2d, fp32 self-attention output for the gate 4d, norm3 input 4d,
    bf16 cross-attention input 2d, cross q 8d, cross output 2d, norm2 input 4d, norm2 output 4d, bf16 FFN input
    2d, FFN hidden before and after GELU 2f + 2f, fp32 FFN output for the gate 4d      → 64·d + 4·f

* without activation checkpointing the graph keeps ``L·(64d + 4f)·N·B``; with it only each block's input
  ``L·4d·N·B`` (fp32 residual), and the backward recomputes one block at a time, ``(64d + 4f)·N·B``;
* backward workspace of one block: the residual-stream gradient (fp32, 4d) and one matmul's input/output
  gradients (≤ 4d + 4f): ``(8d + 4f)·N·B``;
* outside the blocks: the head (fp32 LayerNorm input, output and modulated input) ``12d·N·B``; the text (and
  image) keys/values of every block, computed before the blocks run (``WanDiT._context_kvs``) so kept for all
  blocks even with checkpointing: ``L·12d·T·B`` (k: 8d like q, v: 2d, their bf16 input 2d);
* a no-grad forward (teacher and critic scores, rollout steps) holds one block's live tensors ≈ ``(24d + 4f)·N·B``
  (residual, fp32 norm/modulation temporaries, bf16 q/k/v, RoPE temporary, attention output, FFN hidden) plus the
  bf16 context keys/values of all blocks ``L·4d·T·B``.

A DMD generator update keeps the generator's graph while the teacher and critic score its output, then runs the
backward; a critic update is the same with the critic's graph. Peak activations =
``stored(trainable net) + max(no-grad forward(teacher or critic), recomputed block + backward workspace)``, the
maximum over the trainable nets.

A causal (Self-Forcing) generator (``causal_frames_per_block``) adds its rollout's KV cache, alive from the rollout
to the backward: ``L·2·d·2·N_cached·B`` (bf16 keys and values of every block; N_cached = all frames' tokens, or the
sink + window frames with a rolling window). Each block's grad-enabled exit step stores its checkpointed input, which
over all blocks is the same ``L·4d·N·B`` as one bidirectional pass. With a rolling window the grad-enabled reads of
past keys/values are copies (the ring reuses slots): ``L·2·d·2·Σ_blocks(past tokens)·B`` more. Without a window
they are views of the cache (`sfplus.nets.causal.KVCacheStep`). Measured on one H200 (docs/performance.md):
1.3B Self-Forcing generator step 67.9 GiB against 62.0 GiB bidirectional, +5.9 GiB for a 5.6 GiB cache term.

Sequence parallel (``sequence_parallel = k``, Ulysses, docs/parallelism.md): the k GPUs of a group hold the same
``batch_size`` videos and 1/k of each one's tokens, so every per-token term above (block inputs, the recomputed block,
backward and no-grad working sets, the head, the KV cache, whose rank holds all tokens of 1/k of the heads) uses
N/k; the text keys/values are replicated. The all-to-all buffers of one self-attention add ``14d·N/k·B`` to the
working set (bf16 q, k, v packed to send and received, 2·6d, and the output traded back, 2d). Weights, gradients,
optimizer states, EMA and teacher stay sharded over all ``gpus`` (FSDP2 over the data × sequence mesh).

LoRA (``lora_rank``, :mod:`sfplus.modules.lora`): ONE frozen base (``P·t/S``) serves as teacher, generator and
critic; the trained states are two adapters of ``r·(18d + 2f)`` parameters per block (q/k/v/o of both attentions
d→d, FFN d→f→d) with fp32 weights, gradients and AdamW states, plus the generator adapter's fp32 EMA. Activations
are those of a full net plus, per token per adapted block, the bf16 input copies each adapter's ``A`` keeps for its
backward (``16d + 2f``, :data:`LORA_GRAD_D` / :data:`LORA_GRAD_F`); the FSDP working set is the base's, without
gradients.

Not counted: the latents, noise and text features (MBs), the VAE decode of sample videos (run it outside the
training step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from jsonargparse import CLI

from sfplus.nets.presets import build_dit

__all__ = ["ENCODERS", "MemoryPlan", "PlanError", "main", "net_sizes", "plan"]

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

#: Frozen encoders: (parameter count, bytes per parameter) — umt5-xxl encoder in bf16, Wan VAE in fp32, CLIP fp16.
ENCODERS = {"umt5-xxl": (5.68e9, 2), "wan-vae": (0.127e9, 4), "clip-vit-h": (0.63e9, 2)}

# Per-token bytes of one WanBlock / the head, from the enumeration in the module docstring.
GRAD_BLOCK_D, GRAD_BLOCK_F = 64, 4
CHECKPOINT_INPUT_D = 4
BACKWARD_D, BACKWARD_F = 8, 4
HEAD_D = 12
CONTEXT_GRAD_D, CONTEXT_NOGRAD_D = 12, 4
NOGRAD_D, NOGRAD_F = 24, 4
ULYSSES_D = 14
IMAGE_TOKENS = 257
LORA_GRAD_D, LORA_GRAD_F = 16, 2


class PlanError(ValueError):
    """Bad planner input (names the argument and the value)."""


@dataclass(frozen=True)
class NetSize:
    """Parameter counts of a WanDiT preset and the shapes the activation formula needs."""

    name: str
    params: int
    block_params: int
    root_params: int
    dim: int
    ffn_dim: int
    layers: int
    heads: int
    patch: tuple[int, int, int]
    text_len: int
    image: bool


@functools.lru_cache(maxsize=32)
def net_sizes(name: str, field_name: str = "preset") -> NetSize:
    """Count the parameters of preset ``name`` by building it on the meta device (no memory, no init)."""


    try:
        with torch.device("meta"):
            net = build_dit(name)
    except ValueError as err:
        raise PlanError(f"{field_name}: {err}") from None
    cfg = net.config
    total = sum(p.numel() for p in net.parameters())
    block = sum(p.numel() for p in net.blocks[0].parameters())
    return NetSize(name, total, block, total - block * len(net.blocks), cfg.dim, cfg.ffn_dim, len(net.blocks),
                   cfg.num_heads, tuple(cfg.patch_size), cfg.text_len, cfg.image_dim is not None)


@dataclass
class MemoryPlan:
    """The estimate: ``rows`` of (term, bytes per GPU, how it was computed), their total, and the verdict."""

    rows: list[tuple[str, float, str]]
    gpu_memory_gib: float
    settings: dict
    advice: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(b for _, b, _ in self.rows)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory_gib

    def row(self, name: str) -> float:
        """Bytes of one term, by name."""
        for n, b, _ in self.rows:
            if n == name:
                return b
        raise KeyError(f"no row {name!r}; rows: {[n for n, _, _ in self.rows]}")

    def table(self) -> str:
        s = self.settings
        k = s.get("sequence_parallel", 1)
        batch = (f"batch {s['batch_size']} per sequence-parallel group of {k} GPUs (each GPU 1/{k} of the tokens)"
                 if k > 1 else f"batch {s['batch_size']}/GPU")
        lora = f" (LoRA rank {s['lora_rank']} on one shared base)" if s.get("lora_rank") else ""
        head = (f"per-GPU memory: generator {s['generator']}, critic {s['critic']}, teacher {s['teacher']}{lora}; "
                f"{s['gpus']} GPU(s), {batch}, latents {s['latent_shape']}, activation "
                f"checkpointing {'on' if s['activation_checkpointing'] else 'off'}, encoders "
                f"{'offloaded' if s['offload_encoders'] else 'on GPU'}")
        width = max(len(n) for n, _, _ in self.rows)
        lines = [head, ""]
        lines += [f"  {n:<{width}}  {b / GIB:9.2f} GiB   {how}" for n, b, how in self.rows]
        lines.append(f"  {'total':<{width}}  {self.total_gib:9.2f} GiB")
        verdict = "fits" if self.fits else "does NOT fit"
        lines += ["", f"{verdict} in a {self.gpu_memory_gib:g} GiB GPU "
                      f"({self.gpu_memory_gib - self.total_gib:+.2f} GiB headroom)"]
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _bytes_of(dtype: str, field_name: str) -> int:
    if dtype not in BYTES:
        raise PlanError(f"{field_name}: unknown dtype {dtype!r}; use one of {sorted(BYTES)}")
    return BYTES[dtype]


def _estimate(
    gen: NetSize, critic: NetSize | None, teacher: NetSize | None, *, gpus: int, batch_size: int,
    latent_shape: list[int], activation_checkpointing: bool, offload_encoders: bool, ema: bool,
    master_dtype: str, teacher_dtype: str, overhead_gib: float, causal_frames_per_block: int | None = None,
    local_window_frames: int | None = None, sink_frames: int = 0, sequence_parallel: int = 1,
    lora_rank: int | None = None,
) -> list[tuple[str, float, str]]:
    m = _bytes_of(master_dtype, "master_dtype")
    t = _bytes_of(teacher_dtype, "teacher_dtype")
    trainable = [n for n in (gen, critic) if n is not None]
    p_train = sum(n.params for n in trainable)
    s = gpus
    if lora_rank:
        return _lora_rows(gen, lora_rank, t, s, ema) + _shared_rows(
            gen, critic, teacher, trainable, s=s, batch_size=batch_size, latent_shape=latent_shape,
            activation_checkpointing=activation_checkpointing, offload_encoders=offload_encoders,
            overhead_gib=overhead_gib, causal_frames_per_block=causal_frames_per_block,
            local_window_frames=local_window_frames, sink_frames=sink_frames, sp=sequence_parallel, lora=True)
    rows: list[tuple[str, float, str]] = [
        ("weights (trainable)", p_train * m / s, f"{p_train / 1e9:.3f} B params x {m} B / {s}"),
        ("gradients", p_train * m / s, f"{p_train / 1e9:.3f} B x {m} B / {s}"),
        ("AdamW states", 2 * p_train * m / s, f"2 x {p_train / 1e9:.3f} B x {m} B / {s}"),
    ]
    if ema:
        rows.append(("EMA (generator)", gen.params * 4 / s, f"{gen.params / 1e9:.3f} B x 4 B / {s}"))
    if teacher is not None:
        rows.append(("teacher (frozen)", teacher.params * t / s, f"{teacher.params / 1e9:.3f} B x {t} B / {s}"))
    if s > 1:
        nets = [(n, True) for n in trainable] + ([(teacher, False)] if teacher is not None else [])
        fsdp = max(2 * (n.root_params + 2 * n.block_params) + (6 * n.block_params if train else 0)
                   for n, train in nets)
        rows.append(("FSDP gathered blocks", fsdp, "2 B x (root + 2 blocks) + 6 B x 1 block (grads)"))
    return rows + _shared_rows(
        gen, critic, teacher, trainable, s=s, batch_size=batch_size, latent_shape=latent_shape,
        activation_checkpointing=activation_checkpointing, offload_encoders=offload_encoders,
        overhead_gib=overhead_gib, causal_frames_per_block=causal_frames_per_block,
        local_window_frames=local_window_frames, sink_frames=sink_frames, sp=sequence_parallel)


def lora_params(net: NetSize, rank: int) -> int:
    """Parameters of one adapter on every block's attention q/k/v/o (both) and FFN linears."""
    return net.layers * rank * (18 * net.dim + 2 * net.ffn_dim)


def _lora_rows(gen: NetSize, rank: int, t: int, s: int, ema: bool) -> list[tuple[str, float, str]]:
    p = lora_params(gen, rank)
    rows = [
        ("adapters (gen + critic)", 2 * p * 4 / s, f"2 x {p / 1e6:.1f} M params x 4 B / {s}"),
        ("adapter gradients", 2 * p * 4 / s, f"2 x {p / 1e6:.1f} M x 4 B / {s}"),
        ("adapter AdamW states", 2 * 2 * p * 4 / s, f"2 x 2 x {p / 1e6:.1f} M x 4 B / {s}"),
    ]
    if ema:
        rows.append(("EMA (generator adapter)", p * 4 / s, f"{p / 1e6:.1f} M x 4 B / {s}"))
    rows.append(("base (frozen, shared)", gen.params * t / s, f"{gen.params / 1e9:.3f} B x {t} B / {s}: teacher, "
                 "generator and critic"))
    if s > 1:
        rows.append(("FSDP gathered blocks", 2 * (gen.root_params + 2 * gen.block_params),
                     "2 B x (root + 2 blocks) of the base"))
    return rows


def _shared_rows(gen, critic, teacher, trainable, *, s, batch_size, latent_shape, activation_checkpointing,
                 offload_encoders, overhead_gib, causal_frames_per_block, local_window_frames, sink_frames,
                 sp: int = 1, lora: bool = False) -> list[tuple[str, float, str]]:
    """Activations, KV cache, encoders and overhead: the same with full nets and with LoRA (``sp``: sequence-parallel
    group size; ``s``: GPUs)."""
    rows: list[tuple[str, float, str]] = []
    # ---- activations ----
    c, f_lat, h, w = latent_shape
    acts = []
    for net in trainable:
        pt, ph, pw = net.patch
        if f_lat % pt or h % ph or w % pw:
            raise PlanError(f"latent_shape {latent_shape}: frames/height/width must be divisible by the patch "
                            f"{net.patch} of {net.name}")
        _check_sequence_parallel(net, latent_shape, sp, s)
        n_tok = (f_lat // pt) * (h // ph) * (w // pw) * batch_size // sp  # this GPU's share of the tokens
        ctx = (net.text_len + (IMAGE_TOKENS if net.image else 0)) * batch_size
        d, ff, layers = net.dim, net.ffn_dim, net.layers
        block_grad = (GRAD_BLOCK_D * d + GRAD_BLOCK_F * ff) * n_tok
        if lora:
            block_grad += (LORA_GRAD_D * d + LORA_GRAD_F * ff) * n_tok
        backward = (BACKWARD_D * d + BACKWARD_F * ff) * n_tok
        stored_blocks = layers * CHECKPOINT_INPUT_D * d * n_tok if activation_checkpointing else layers * block_grad
        stored = stored_blocks + HEAD_D * d * n_tok + layers * CONTEXT_GRAD_D * d * ctx
        working = backward + (block_grad if activation_checkpointing else 0)
        if sp > 1:
            working += ULYSSES_D * d * n_tok
        scorers = [x for x in (teacher, critic) if x is not None and x is not net] or [net]
        nograd = max((NOGRAD_D * x.dim + NOGRAD_F * x.ffn_dim) * n_tok + x.layers * CONTEXT_NOGRAD_D * x.dim * ctx
                     for x in scorers)
        acts.append((stored + max(working, nograd), n_tok, net.name))
    peak, n_tok, name = max(acts)
    share = f", 1/{sp} of each video" if sp > 1 else ""
    how = (f"{n_tok} tokens ({name}{share}): " + ("block inputs + one recomputed block" if activation_checkpointing
                                           else "all blocks' intermediates") + " + backward/no-grad working set")
    rows.append(("activations", peak, how))
    if causal_frames_per_block:
        rows += [(n, b / sp, how + (f" / {sp} (heads split)" if sp > 1 else ""))
                 for n, b, how in _kv_cache_rows(gen, latent_shape, batch_size, causal_frames_per_block,
                                                 local_window_frames, sink_frames)]

    if not offload_encoders:
        names = ["umt5-xxl", "wan-vae"] + (["clip-vit-h"] if gen.image else [])
        enc = sum(ENCODERS[k][0] * ENCODERS[k][1] for k in names)
        rows.append(("frozen encoders", enc, " + ".join(names) + " (replicated)"))
    rows.append(("fixed overhead", overhead_gib * GIB, "CUDA context, NCCL buffers, fragmentation"))
    return rows


def _check_sequence_parallel(net: NetSize, latent_shape: list[int], sp: int, gpus: int) -> None:
    """The group size must divide the GPUs, the heads (Ulysses splits them) and the tokens of a frame."""
    _, _, h, w = latent_shape
    per_frame = (h // net.patch[1]) * (w // net.patch[2])
    if sp < 1 or gpus % sp:
        raise PlanError(f"sequence_parallel={sp} must be >= 1 and divide gpus={gpus}")
    if net.heads % sp:
        raise PlanError(f"sequence_parallel={sp} must divide the {net.heads} attention heads of {net.name}")
    if per_frame % sp:
        raise PlanError(f"sequence_parallel={sp} must divide the {per_frame} tokens per latent frame of "
                        f"latent_shape {latent_shape}")


def _sequence_parallel_sizes(nets: list[NetSize], latent_shape: list[int], gpus: int) -> list[int]:
    """Group sizes > 1 that every trained net and the video allow on ``gpus`` GPUs, smallest first."""
    sizes = []
    for k in range(2, gpus + 1):
        try:
            for net in nets:
                _check_sequence_parallel(net, latent_shape, k, gpus)
        except PlanError:
            continue
        sizes.append(k)
    return sizes


def _kv_cache_rows(gen: NetSize, latent_shape: list[int], batch: int, fpb: int, window: int | None,
                   sink: int) -> list[tuple[str, float, str]]:
    """The causal rollout's KV cache (and, with a rolling window, the copies of past keys/values kept for the
    backward), from the module docstring."""
    _, frames, h, w = latent_shape
    pt, ph, pw = gen.patch
    per_frame = (h // ph) * (w // pw)
    latent_frames = frames // pt
    if fpb < 1 or latent_frames % fpb:
        raise PlanError(f"causal_frames_per_block must divide the {latent_frames} latent frames, got {fpb}")
    slots = latent_frames if window is None else min(latent_frames, sink + window)
    per_token = gen.layers * 2 * gen.dim * 2 * batch  # k and v, bf16, every layer
    rows = [("KV cache (causal rollout)", per_token * slots * per_frame,
             f"{gen.layers} layers x k,v x {gen.dim} x 2 B x {slots} frames x {per_frame} tokens")]
    if window is not None:
        past = sum(min(start, sink + window) for start in range(0, latent_frames, fpb))
        rows.append(("past K/V copies (window)", per_token * past * per_frame,
                     f"grad-enabled reads of a rolling window: {past} frames over all blocks"))
    return rows


def plan(
    generator: str = "wan2.1-t2v-14b",
    critic: str | None = "wan2.1-t2v-14b",
    teacher: str | None = "wan2.1-t2v-14b",
    gpus: int = 64,
    gpu_memory_gib: float = 80.0,
    batch_size: int = 1,
    latent_shape: list[int] | None = None,
    activation_checkpointing: bool = True,
    offload_encoders: bool = False,
    ema: bool = True,
    master_dtype: Literal["fp32", "bf16"] = "fp32",
    teacher_dtype: Literal["bf16", "fp32"] = "bf16",
    overhead_gib: float = 4.0,
    causal_frames_per_block: int | None = None,
    local_window_frames: int | None = None,
    sink_frames: int = 0,
    sequence_parallel: int = 1,
    lora_rank: int | None = None,
) -> MemoryPlan:
    """Estimate per-GPU memory of a training recipe and say whether it fits.

    Args:
        generator: WanDiT preset of the trained generator (``sfplus.nets.presets``).
        critic: preset of the fake-score critic (trained too); None for diffusion training.
        teacher: preset of the frozen teacher; None for diffusion training.
        gpus: GPUs the weights, gradients, optimizer states, EMA and teacher are sharded over (FSDP).
        gpu_memory_gib: memory of one GPU (H100: 80, H200: 141).
        batch_size: videos per GPU per update.
        latent_shape: ``[C, F, H, W]`` of one latent video (default ``[16, 21, 60, 104]`` = 81×480×832).
        activation_checkpointing: recompute each block in the backward (keeps only block inputs).
        offload_encoders: text/image encoders and VAE off the GPU (CPU, or features precomputed).
        ema: keep an fp32 EMA of the generator.
        master_dtype: dtype of trainable weights, gradients and AdamW states.
        teacher_dtype: dtype of the frozen teacher.
        overhead_gib: fixed per-GPU overhead.
        causal_frames_per_block: latent frames per block of a causal (Self-Forcing) generator; None for a
            bidirectional one. Adds the rollout's KV cache.
        local_window_frames, sink_frames: the causal generator's rolling attention window and sink frames.
        sequence_parallel: GPUs that split each video's tokens (Ulysses; ``scale.sequence_parallel``); must divide
            ``gpus``, the heads and the tokens per latent frame. ``batch_size`` is then videos per group.
        lora_rank: LoRA distillation (``lora: {rank: ...}``): one frozen base in ``teacher_dtype`` shared by teacher,
            generator and critic, which train rank-``lora_rank`` adapters (all presets must be the same).
    """
    latent_shape = list(latent_shape or [16, 21, 60, 104])
    if len(latent_shape) != 4 or min(latent_shape) <= 0:
        raise PlanError(f"latent_shape must be four positive ints [C, F, H, W], got {latent_shape}")
    if gpus < 1:
        raise PlanError(f"gpus must be >= 1, got {gpus}")
    if batch_size < 1:
        raise PlanError(f"batch_size must be >= 1, got {batch_size}")
    if gpu_memory_gib <= 0:
        raise PlanError(f"gpu_memory_gib must be positive, got {gpu_memory_gib}")
    gen = net_sizes(generator, "generator")
    crit = net_sizes(critic, "critic") if critic else None
    teach = net_sizes(teacher, "teacher") if teacher else None
    if lora_rank is not None:
        if lora_rank < 1:
            raise PlanError(f"lora_rank must be >= 1, got {lora_rank}")
        if {critic, teacher} != {generator}:
            raise PlanError(f"lora_rank: generator, critic and teacher are one base; got generator {generator}, "
                            f"critic {critic}, teacher {teacher}")
    settings = dict(generator=generator, critic=critic, teacher=teacher, gpus=gpus, batch_size=batch_size,
                    latent_shape=latent_shape, activation_checkpointing=activation_checkpointing,
                    offload_encoders=offload_encoders, ema=ema, master_dtype=master_dtype,
                    teacher_dtype=teacher_dtype, overhead_gib=overhead_gib)
    fixed = dict(latent_shape=latent_shape, ema=ema, master_dtype=master_dtype, teacher_dtype=teacher_dtype,
                 overhead_gib=overhead_gib, causal_frames_per_block=causal_frames_per_block,
                 local_window_frames=local_window_frames, sink_frames=sink_frames, lora_rank=lora_rank)
    settings.update(causal_frames_per_block=causal_frames_per_block, local_window_frames=local_window_frames,
                    sink_frames=sink_frames, sequence_parallel=sequence_parallel, lora_rank=lora_rank)

    def total(**change) -> float:
        kw = dict(gpus=gpus, batch_size=batch_size, activation_checkpointing=activation_checkpointing,
                  offload_encoders=offload_encoders, sequence_parallel=sequence_parallel, **fixed)
        kw.update(change)
        return sum(b for _, b, _ in _estimate(gen, crit, teach, **kw)) / GIB

    result = MemoryPlan(_estimate(gen, crit, teach, gpus=gpus, batch_size=batch_size,
                                  activation_checkpointing=activation_checkpointing, offload_encoders=offload_encoders,
                                  sequence_parallel=sequence_parallel, **fixed), gpu_memory_gib, settings)
    if result.fits:
        return result
    g = gpu_memory_gib
    if not activation_checkpointing:
        result.advice.append(f"turn activation checkpointing on: {total(activation_checkpointing=True):.1f} GiB")
    if not offload_encoders:
        result.advice.append(f"offload the frozen encoders (or precompute text features): "
                             f"{total(offload_encoders=True):.1f} GiB")
    if batch_size > 1:
        smaller = next((b for b in range(batch_size - 1, 0, -1) if total(batch_size=b) <= g), 1)
        result.advice.append(f"batch {smaller} per GPU (more GPUs or gradient accumulation keep the global batch): "
                             f"{total(batch_size=smaller):.1f} GiB")
    more = next((n for n in (8 * 2**k for k in range(11)) if n > gpus and total(gpus=n) <= g), None)
    if more is not None:
        result.advice.append(f"shard over {more} GPUs: {total(gpus=more):.1f} GiB")
    else:
        floor = total(gpus=10**9)
        result.advice.append(f"more GPUs alone cannot make it fit: the unsharded part (activations, encoders, "
                             f"overhead) is {floor:.1f} GiB")
    trained = [n for n in (gen, crit) if n is not None]
    larger = [k for k in _sequence_parallel_sizes(trained, latent_shape, gpus) if k > sequence_parallel]
    fitting = next((k for k in larger if total(sequence_parallel=k) <= g), None)
    if fitting is not None:
        result.advice.append(f"split each video's tokens: sequence parallel over {fitting} GPUs "
                             f"(scale.sequence_parallel: {fitting}, tensor_parallel_size: {fitting}): "
                             f"{total(sequence_parallel=fitting):.1f} GiB")
    elif larger:
        result.advice.append(f"sequence parallel over {larger[-1]} GPUs (the most {gpus} GPUs allow): "
                             f"{total(sequence_parallel=larger[-1]):.1f} GiB")
    best = total(activation_checkpointing=True, offload_encoders=True, batch_size=1)
    result.advice.append(f"all of checkpointing + offloaded encoders + batch 1 on {gpus} GPUs: {best:.1f} GiB")
    return result


def main(argv: list[str] | None = None, exit_on_error: bool = True) -> MemoryPlan:
    """``sfplus plan ...``: print the table (arguments as in :func:`plan`, e.g. ``--gpus 8 --critic null``)."""

    result = CLI(plan, args=argv, as_positional=False, exit_on_error=exit_on_error)
    print(result.table())
    return result


if __name__ == "__main__":
    import sys

    try:
        main()
    except PlanError as err:
        print(f"sfplus plan: error: {err}", file=sys.stderr)
        sys.exit(2)
