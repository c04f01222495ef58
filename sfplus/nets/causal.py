"""Causal (frame-autoregressive) attention for WanDiT: block-causal masks and the streaming KV cache
(docs/wan_architecture.md, 'Causal DiT').

Frames are grouped into blocks (optionally frame 0 alone first). A query in a block ending at frame b (exclusive)
attends to every key of frames < b — bidirectional inside its block, causal across blocks — optionally restricted to
the last `local_window_frames` frames [b - W, b) plus the first `sink_frames` frames (attention sink).

Two ways to compute the same thing:
- parallel (training): all frames in one forward with a block mask (`block_causal_mask`);
- stepping (streaming): one block per forward with a `KVCache` holding the earlier frames' keys/values.

Differences from Self-Forcing's `CausalWanModel` (deliberate): its `local_attn_size` counts the sink frames inside the
window and its training mask ignores the sink (so training and streaming disagree when sink > 0); here the window is
W recent frames *plus* the sink in both modes, so they agree exactly. No token padding to multiples of 128 is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import create_block_mask

__all__ = ["BlockCausal", "KVCache", "KVCacheStep", "block_causal_mask", "block_frame_ends"]


@dataclass(frozen=True)
class BlockCausal:
    """Block-causal attention over frames (parallel training mode of WanDiT).

    frames_per_block: frames per causal block (Self-Forcing uses 3).
    independent_first_frame: frame 0 forms its own block, then blocks of frames_per_block (I2V-style).
    local_window_frames: if set, a block ending at frame b only sees frames [b - W, b) (plus the sink); W must be
        at least frames_per_block so a block always sees itself.
    sink_frames: the first frames that stay visible to every later block when a window is set.
    backend: "flex" (flex-attention BlockMask), "sdpa" (dense boolean mask: O(L²) memory, portable reference) or
        "auto" (default): flex on CUDA, sdpa elsewhere — flex has no CPU backward, and off-GPU it runs unfused
        (materialising the full score matrix anyway).
    """

    frames_per_block: int
    independent_first_frame: bool = False
    local_window_frames: int | None = None
    sink_frames: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.frames_per_block < 1:
            raise ValueError(f"BlockCausal.frames_per_block must be >= 1, got {self.frames_per_block}")
        _check_window(self.local_window_frames, self.sink_frames, self.frames_per_block, "BlockCausal")
        if self.backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"BlockCausal.backend must be 'auto', 'flex' or 'sdpa', got {self.backend!r}")

    def resolve_backend(self, device: torch.device | str) -> str:
        """"flex" or "sdpa" for tensors on this device."""
        if self.backend != "auto":
            return self.backend
        return "flex" if torch.device(device).type == "cuda" else "sdpa"


def _check_window(window: int | None, sink: int, block: int, owner: str) -> None:
    if sink < 0:
        raise ValueError(f"{owner}.sink_frames must be >= 0, got {sink}")
    if window is None:
        if sink:
            raise ValueError(f"{owner}.sink_frames={sink} needs local_window_frames (without a window all frames "
                             "are visible anyway)")
        return
    if window < block:
        raise ValueError(f"{owner}.local_window_frames={window} must be >= the block size {block} "
                         "(a block must see all of its own frames)")


def block_frame_ends(causal: BlockCausal, frames: int) -> list[int]:
    """For each frame, the end (exclusive) frame index of its block; the last block may be shorter."""
    ends, start = [], 0
    if causal.independent_first_frame and frames > 0:
        ends.append(1)
        start = 1
    for f in range(start, frames):
        ends.append(min(start + ((f - start) // causal.frames_per_block + 1) * causal.frames_per_block, frames))
    return ends


def block_causal_mask(causal: BlockCausal, frames: int, tokens_per_frame: int, device: torch.device | str):
    """Mask over the F·S tokens (frame-major): a flex `BlockMask`, or a dense bool [L, L] (True = attend) when the
    backend resolves to sdpa."""
    s = tokens_per_frame
    frame_ends = torch.tensor(block_frame_ends(causal, frames), dtype=torch.long, device=device)
    ends = frame_ends.repeat_interleave(s) * s  # [L] end token (exclusive) of each query's block
    if causal.local_window_frames is None:
        starts = torch.zeros_like(ends)
    else:
        starts = (ends - causal.local_window_frames * s).clamp(min=0)
    sink = causal.sink_frames * s

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < ends[q_idx]) & ((kv_idx >= starts[q_idx]) | (kv_idx < sink))

    length = frames * s
    if causal.resolve_backend(device) == "sdpa":
        idx = torch.arange(length, device=device)
        return mask_mod(None, None, idx[:, None], idx[None, :])

    return create_block_mask(mask_mod, None, None, length, length, device=device, _compile=False)


def teacher_forcing_mask(causal: BlockCausal, frames: int, tokens_per_frame: int, device: torch.device | str):
    """Mask over the 2·F·S tokens [clean frames ; noisy frames] of the parallel teacher-forcing mode
    (docs/wan_architecture.md, 'Teacher-forcing mode').

    A clean query in block j attends to the clean keys of blocks <= j (block-causal, as when the clean blocks were
    cached one by one); a noisy query in block j attends to the clean keys of blocks < j and the noisy keys of its
    own block j. Flex `BlockMask`, or dense bool [2L, 2L] (True = attend) when the backend resolves to sdpa.
    """
    if causal.local_window_frames is not None:
        raise ValueError("teacher forcing (clean_x) supports no local attention window: set "
                         "BlockCausal.local_window_frames=None")
    s, length = tokens_per_frame, frames * tokens_per_frame
    frame_ends = block_frame_ends(causal, frames)
    frame_starts, start = [], 0
    for f, end in enumerate(frame_ends):
        if f and frame_ends[f - 1] != end:  # a new block begins at frame f
            start = f
        frame_starts.append(start)
    ends = torch.tensor(frame_ends, dtype=torch.long, device=device).repeat_interleave(s) * s  # [L]
    starts = torch.tensor(frame_starts, dtype=torch.long, device=device).repeat_interleave(s) * s  # [L]

    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, kv_noisy = q_idx >= length, kv_idx >= length
        q = torch.where(q_noisy, q_idx - length, q_idx)
        kv = torch.where(kv_noisy, kv_idx - length, kv_idx)
        clean_query = ~kv_noisy & (kv < ends[q])
        noisy_query = torch.where(kv_noisy, (kv >= starts[q]) & (kv < ends[q]), kv < starts[q])
        return torch.where(q_noisy, noisy_query, clean_query)

    if causal.resolve_backend(device) == "sdpa":
        idx = torch.arange(2 * length, device=device)
        return mask_mod(None, None, idx[:, None], idx[None, :])

    return create_block_mask(mask_mod, None, None, 2 * length, 2 * length, device=device, _compile=False)


class KVCache:
    """Per-layer self-attention keys/values of already generated frames, plus cached cross-attention keys/values.

    Usage: `model(x_block, t_block, context, kv_cache=cache, frame_offset=k)` processes frames [k, k + n) only.
    Each call writes the block's (post-RoPE) keys and values into the cache slots of those frames and makes them the
    newest frames: calling again at the same offset overwrites the same slots (re-denoising steps, the clean-context
    refresh at t = 0) and forgets anything after k + n. The block's queries attend to the cached frames in the window
    [k + n - W, k) plus the sink frames, followed by the block's own keys/values.

    Gradient semantics (reference bug B22, docs/algorithms.md, 'Reference bugs'): keys/values are stored DETACHED. The
    current block attends to the detached earlier frames concatenated with its own *live* keys/values, so a loss on
    a block back-propagates through that block's own K/V projections but never into earlier blocks' forward passes.
    Cross-attention keys/values are cached (detached) on the first call and reused while grad is disabled; with
    grad enabled they are recomputed from `context` each call so the text/cross-attention weights get gradients.
    The cache is bound to one context (and image): `reset()` it (or build another) for a different prompt / CFG branch.

    Memory: with no window the buffers hold `max_frames` frames; with a window they hold sink_frames +
    local_window_frames frames as a ring (oldest non-sink frame evicted first; RoPE positions stay absolute because
    keys are rotated before they are stored). Buffers are [B, slots·S, heads, head_dim] per layer, allocated on the
    first write with the keys' dtype/device and head count unless `dtype` and `device` are given (then with all
    heads). Under sequence parallelism (sfplus.nets.sequence_parallel) a rank's keys are all tokens of
    num_heads / sp heads: each rank's cache holds its heads of the global sequence.
    """

    def __init__(
        self,
        config,
        batch_size: int,
        max_frames: int,
        tokens_per_frame: int,
        *,
        local_window_frames: int | None = None,
        sink_frames: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """config: the model's WanConfig; max_frames: the largest frame index + 1 that will be generated (with a
        window it only bounds the frame index: the buffers hold sink_frames + local_window_frames frames);
        tokens_per_frame: H'·W' = (H / 2)·(W / 2) of the latent (1560 at 480x832)."""
        if batch_size < 1 or max_frames < 1 or tokens_per_frame < 1:
            raise ValueError(f"KVCache needs positive batch_size/max_frames/tokens_per_frame, got "
                             f"{batch_size}/{max_frames}/{tokens_per_frame}")
        _check_window(local_window_frames, sink_frames, 1, "KVCache")
        self.num_layers, self.num_heads, self.head_dim = config.num_layers, config.num_heads, config.head_dim
        self.batch_size, self.max_frames, self.tokens_per_frame = batch_size, max_frames, tokens_per_frame
        self.window, self.sink = local_window_frames, sink_frames
        self.slots = max_frames if local_window_frames is None else min(max_frames, sink_frames + local_window_frames)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.end_frame = 0  # frames [0, end_frame) have been written (and are cached unless evicted)
        self.frame_writes: dict[int, int] = {}  # frame -> how many forwards wrote it (see KVCacheStep)
        self._cross: list[tuple[torch.Tensor, ...]] | None = None
        if dtype is not None and device is not None:
            self._allocate(dtype, torch.device(device))

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget all frames and the cross-attention cache (buffers stay allocated)."""
        self.end_frame, self._cross = 0, None
        self.frame_writes = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _allocate(self, dtype: torch.dtype, device: torch.device, heads: int | None = None) -> None:
        heads = self.num_heads if heads is None else heads
        shape = (self.batch_size, self.slots * self.tokens_per_frame, heads, self.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]

    def _slot(self, frame: int) -> int:
        if self.window is None or frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def _token_index(self, frames: list[int], device: torch.device) -> torch.Tensor | slice:
        """Buffer token positions of these frames (a slice when their slots are contiguous: no gather copy)."""
        s = self.tokens_per_frame
        slots = [self._slot(f) for f in frames]
        if not slots:
            return slice(0, 0)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0] * s, (slots[-1] + 1) * s)
        idx = torch.tensor(slots, dtype=torch.long, device=device)[:, None] * s
        return (idx + torch.arange(s, device=device)[None, :]).flatten()

    def begin(self, frame_offset: int, frames: int, tokens_per_frame: int, batch_size: int) -> KVCacheStep:
        """Plan one forward over frames [frame_offset, frame_offset + frames) (called by WanDiT.forward)."""
        k, n, b = frame_offset, frames, frame_offset + frames
        if tokens_per_frame != self.tokens_per_frame or batch_size != self.batch_size:
            raise ValueError(f"KVCache was built for batch {self.batch_size} x {self.tokens_per_frame} tokens/frame, "
                             f"got batch {batch_size} x {tokens_per_frame}")
        if k < 0 or k > self.end_frame:
            raise ValueError(f"frame_offset={k} must be in [0, {self.end_frame}] (frames [0, {self.end_frame}) are "
                             "cached; blocks must be written in order without gaps)")
        if b > self.max_frames:
            raise ValueError(f"frames [{k}, {b}) exceed the KVCache's max_frames={self.max_frames}")
        if self.window is not None:
            if n > self.window:
                raise ValueError(f"block of {n} frames is larger than local_window_frames={self.window}")
            if b < self.end_frame:
                raise ValueError(f"cannot rewrite frames [{k}, {b}) once frames up to {self.end_frame} were written "
                                 "with a rolling window (frames it needs may have been evicted)")
        lo = 0 if self.window is None else max(0, b - self.window)
        past = sorted(set(range(lo, k)) | set(range(min(self.sink, k))))
        step = KVCacheStep(self, b, list(range(k, b)), past)
        for frame in range(k, b):
            self.frame_writes[frame] = self.frame_writes.get(frame, 0) + 1
        return step

    def commit(self, step: KVCacheStep) -> None:
        """Finish a forward: frames [0, frame_offset + frames) are now the cached frames."""
        self.end_frame = step.end_frame

    # ------------------------------------------------------------------ cross-attention part
    def has_cross(self) -> bool:
        return self._cross is not None

    def cross(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Cached cross-attention (k, v[, k_img, v_img]) of one layer, each [B, Lc, heads, head_dim]."""
        if self._cross is None:
            raise RuntimeError("KVCache has no cross-attention keys/values yet")
        return self._cross[layer]

    def set_cross(self, kvs: list[tuple[torch.Tensor, ...]]) -> None:
        if len(kvs) != self.num_layers:
            raise ValueError(f"expected cross keys/values for {self.num_layers} layers, got {len(kvs)}")
        self._cross = [tuple(t.detach() for t in kv) for kv in kvs]


class KVCacheStep:
    """One forward's view of a KVCache (made by `KVCache.begin`, passed to every block).

    The first `update` of a layer writes the block's keys/values into the cache and reads the past frames; it keeps
    what it read, so a second call for the same layer — activation-checkpoint recomputation during backward, after
    the cache may have moved on — returns the same keys/values and leaves the cache alone. (Non-reentrant
    checkpointing only: reentrant checkpointing runs the first forward without grad, when reads are not copied.)

    What is kept is a view of the cache, not a copy, unless the cache is a rolling window (whose slots are reused
    for later frames): without a window a frame's slots only change when that frame itself is written again, which
    a forward rollout never does to frames before the current block. A Self-Forcing generator step on 21 frames
    would otherwise hold a copy of every block's past keys/values until backward (16.9 GiB at 1.3B, 480x832). If a
    past frame is rewritten before the backward anyway, the recomputation raises instead of using changed values.
    """

    def __init__(self, cache: KVCache, end_frame: int, write_frames: list[int], read_frames: list[int]) -> None:
        self.cache, self.end_frame = cache, end_frame
        self._write_frames, self._read_frames = write_frames, read_frames
        self._index: tuple | None = None
        self._past: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._read_writes = [cache.frame_writes.get(f, 0) for f in read_frames]  # versions of what is read

    @torch.compiler.disable  # cache bookkeeping stays eager; a compiled block runs as graphs around it
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the block's k, v [B, n·S, heads, head_dim] (detached) and return the keys/values to attend to:
        the cached window + sink frames, then the block's live k, v."""
        if layer not in self._past:
            self._past[layer] = self._write_and_read(layer, k, v)
            span = self._contiguous_span()
            if span is not None and not torch.is_grad_enabled() and k.dtype == self.cache.k[layer].dtype:
                # Inference: the cache now holds past frames and this block side by side, with the same values
                # as the live k, v (no grad, same dtype): attend to that slice, no concatenated copy.
                return self.cache.k[layer][:, span], self.cache.v[layer][:, span]
        else:  # a recomputation: the past it read must still be in the cache
            self._check_past_unchanged()
        past = self._past[layer]
        if past is None:
            return k, v
        return torch.cat([past[0].to(k.dtype), k], dim=1), torch.cat([past[1].to(v.dtype), v], dim=1)

    def _check_past_unchanged(self) -> None:
        if self.cache.window is not None:  # windowed reads are copies
            return
        now = [self.cache.frame_writes.get(f, 0) for f in self._read_frames]
        if now != self._read_writes:
            changed = [f for f, a, b in zip(self._read_frames, self._read_writes, now) if a != b]
            raise RuntimeError(
                f"KVCache: frames {changed} were rewritten after a grad-enabled forward read them and before its "
                "backward recomputed it; run the backward first, or use a separate KVCache for the rewrite")

    def _contiguous_span(self) -> slice | None:
        """The buffer slice [past frames | this block] when both are contiguous and adjacent, else None."""
        write, read = self._index  # type: ignore[misc]
        if not isinstance(write, slice):
            return None
        if not self._read_frames:
            return write
        if isinstance(read, slice) and read.stop == write.start:
            return slice(read.start, write.stop)
        return None

    def _write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        cache = self.cache
        if not cache.k:
            cache._allocate(k.dtype, k.device, k.shape[2])
        elif cache.k[layer].shape[2] != k.shape[2]:
            raise ValueError(f"KVCache holds {cache.k[layer].shape[2]} heads per token but the model attends with "
                             f"{k.shape[2]} (sequence parallel: build the cache without dtype/device, or reset it)")
        if self._index is None:  # planned once per forward, shared by all layers
            device = cache.k[0].device
            self._index = (cache._token_index(self._write_frames, device),
                           cache._token_index(self._read_frames, device))
        write, read = self._index
        ck, cv = cache.k[layer], cache.v[layer]
        if isinstance(write, slice):
            ck[:, write] = k.detach().to(ck.dtype)
            cv[:, write] = v.detach().to(cv.dtype)
        else:
            ck.index_copy_(1, write, k.detach().to(ck.dtype))
            cv.index_copy_(1, write, v.detach().to(cv.dtype))
        if not self._read_frames:
            return None
        if isinstance(read, slice):
            past_k, past_v = ck[:, read], cv[:, read]
            if torch.is_grad_enabled() and cache.window is not None:
                # a rolling window reuses these slots for later frames before the backward's recompute: copy
                past_k, past_v = past_k.clone(), past_v.clone()
        else:
            past_k, past_v = ck.index_select(1, read), cv.index_select(1, read)  # already copies
        return past_k, past_v
