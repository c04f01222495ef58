"""Self-Forcing training rollout of a causal (frame-autoregressive) WanDiT through its KV cache
(docs/algorithms.md, 'Causal rollout (Self-Forcing)').

The video is generated block by block (`frames_per_block` latent frames each, optionally frame 0 alone). Per block:

1. steps ``0 .. exit - 1`` of the few-step sampler run without grad: predict x0, re-noise it with fresh noise to the
   next timestep;
2. the exit step runs with grad (if allowed for this block) and its x0 is the block's output;
3. the clean-context refresh: under no_grad the net runs once more on ``add_noise(x0.detach(), eps, context_noise)``
   at ``t = context_noise`` at the same frame offset, overwriting the block's cache slots. ``context_noise = 0`` means
   exactly clean, ``t = 0`` (the reference noises with sigma ~0.005 there while telling the net t=0: B4 in
   docs/algorithms.md, 'Reference bugs').

Gradient semantics (an explicit choice about the reference's B22, docs/algorithms.md, 'Reference bugs'): the KV cache
stores DETACHED keys/values (see `sfplus.nets.causal.KVCache`). A block's loss back-propagates through that block's
exit-step forward only — through its own live keys/values and its input (produced without grad) — and never into earlier
blocks' forwards. The reference instead lets gradient leak through the cache into earlier exit steps (a straight-through
gradient evaluated at the clean-context values); that is not reproduced.

Initial latents (I2V / video extension) are written into the cache first, one no-grad call per context block, with
the same context noising as generated blocks (so the cache always holds context of one kind, at train and test time).

The cache is sized from the net's config and the input shape (layers, heads, head_dim, tokens per frame, frames): no
1.3B/14B or 480x832 constants (B1, B15 in docs/algorithms.md, 'Reference bugs').
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sfplus.conditioning.conditioner import Cond
from sfplus.flow import FlowNet, add_noise, flow_to_x0, randn_like, timestep_tensor
from sfplus.nets.causal import BlockCausal, KVCache
from sfplus.rollout.bidirectional import Rollout

__all__ = [
    "BlockLayout",
    "CallCounter",
    "CausalLayoutError",
    "CausalRollout",
    "block_cond",
    "block_layout",
    "causal_rollout",
    "new_kv_cache",
    "prepare_causal_generation",
    "run_causal_blocks",
]


class CausalLayoutError(ValueError):
    """Frame counts, block sizes, exit indices or input shapes that a causal rollout cannot use."""


@dataclass(frozen=True)
class BlockLayout:
    """How the frames of a causal generation are cut into blocks (absolute frame ranges, end exclusive).

    Attributes:
        context: blocks of the initial latent frames [0, F0), each written into the cache by one call.
        generated: blocks of the generated frames [F0, F0 + F), each denoised then refreshed.
        first_frame_alone: frame 0 forms its own block. The whole layout equals the parallel block-causal
            partition ``BlockCausal(frames_per_block, independent_first_frame=first_frame_alone)`` of all frames.
        total_frames: F0 + F.
    """

    context: list[tuple[int, int]]
    generated: list[tuple[int, int]]
    first_frame_alone: bool
    total_frames: int

    def block_causal(self, frames_per_block: int, local_window_frames: int | None = None,
                     sink_frames: int = 0) -> BlockCausal:
        """The parallel (training-mask) equivalent of this layout."""
        return BlockCausal(frames_per_block, independent_first_frame=self.first_frame_alone,
                           local_window_frames=local_window_frames, sink_frames=sink_frames)


def _chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, a + size) for a in range(start, stop, size)]


def block_layout(num_frames: int, frames_per_block: int, *, independent_first_frame: bool = False,
                 initial_frames: int = 0) -> BlockLayout:
    """Blocks of a causal generation of ``num_frames`` new frames after ``initial_frames`` given ones.

    Rules (as the reference's training and inference pipelines cut blocks):
    * initial frames: frame 0 alone when ``independent_first_frame`` or when the initial latent is one frame (an
      image), then blocks of ``frames_per_block``; otherwise blocks of ``frames_per_block`` from frame 0;
    * generated frames: with no initial latent and ``independent_first_frame``, frame 0 alone then blocks;
      otherwise blocks of ``frames_per_block``.
    Every count must divide evenly (a partial block would change the attention pattern): CausalLayoutError else.
    """
    n, f0 = int(num_frames), int(initial_frames)
    if frames_per_block < 1:
        raise CausalLayoutError(f"frames_per_block must be >= 1, got {frames_per_block}")
    if n < 1:
        raise CausalLayoutError(f"need at least one frame to generate, got num_frames={n}")
    if f0 < 0:
        raise CausalLayoutError(f"initial_frames must be >= 0, got {f0}")
    nfpb = frames_per_block
    alone = independent_first_frame or f0 == 1
    context: list[tuple[int, int]] = []
    if f0:
        first = 1 if alone else 0
        if (f0 - first) % nfpb:
            what = "after its first frame " if first else ""
            raise CausalLayoutError(
                f"initial latent of {f0} frames: the {f0 - first} frames {what}are not a multiple of "
                f"frames_per_block={nfpb}" + ("" if alone else " (independent_first_frame=True puts frame 0 alone)"))
        context = ([(0, 1)] if first else []) + _chunks(first, f0, nfpb)
        start = f0
        if n % nfpb:
            raise CausalLayoutError(f"num_frames={n} generated after an initial latent must be a multiple of "
                                    f"frames_per_block={nfpb}")
        generated = _chunks(start, start + n, nfpb)
    elif independent_first_frame:
        if (n - 1) % nfpb:
            raise CausalLayoutError(f"num_frames={n} with independent_first_frame needs 1 + k·frames_per_block "
                                    f"frames (frames_per_block={nfpb})")
        generated = [(0, 1)] + _chunks(1, n, nfpb)
    else:
        if n % nfpb:
            raise CausalLayoutError(f"num_frames={n} is not a multiple of frames_per_block={nfpb}")
        generated = _chunks(0, n, nfpb)
    return BlockLayout(context, generated, alone, f0 + n)


def _dit_config(net: FlowNet):
    """The WanConfig of ``net`` (also through common wrappers: `.module` (DDP), `._orig_mod` (torch.compile))."""
    for obj in (net, getattr(net, "module", None), getattr(net, "_orig_mod", None)):
        cfg = getattr(obj, "config", None)
        if cfg is not None and all(hasattr(cfg, a) for a in ("num_layers", "num_heads", "head_dim", "patch_size")):
            return cfg
    raise CausalLayoutError(f"{type(net).__name__} has no WanConfig-like `.config` (num_layers, num_heads, head_dim, "
                            "patch_size): a causal rollout needs a WanDiT to size its KV cache")


def new_kv_cache(net: FlowNet, batch: int, total_frames: int, height: int, width: int, *,
                 local_window_frames: int | None = None, sink_frames: int = 0) -> KVCache:
    """A fresh KVCache for ``net`` and latents [batch, C, total_frames, height, width], sized from the net's config."""
    cfg = _dit_config(net)
    pt, ph, pw = cfg.patch_size
    if pt != 1:
        raise CausalLayoutError(f"causal generation needs a temporal patch of 1 (frame offsets count latent frames), "
                                f"the net has patch_size={cfg.patch_size}")
    if height % ph or width % pw:
        raise CausalLayoutError(f"latent size {height}x{width} is not divisible by the patch {ph}x{pw}")
    return KVCache(cfg, batch, total_frames, (height // ph) * (width // pw),
                   local_window_frames=local_window_frames, sink_frames=sink_frames)


def _positive_steps(timesteps: Sequence[float]) -> list[float]:
    steps = [float(t) for t in timesteps]
    if steps and steps[-1] == 0:  # the reference lists may end with the final 0
        steps = steps[:-1]
    if not steps or any(t <= 0 or t > 1000 for t in steps):
        raise CausalLayoutError(f"timesteps must be a non-empty list in (0, 1000] (a trailing 0 is ignored), "
                                f"got {list(timesteps)}")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise CausalLayoutError(f"timesteps must decrease, got {steps}")
    return steps


def block_cond(cond: Cond, start: int, stop: int, total: int) -> Cond:
    """The cond dict of frames [start, stop) out of ``total``: ``y`` (per-frame I2V conditioning) is sliced, the rest
    (text context, CLIP tokens) is shared by every block."""
    y = cond.get("y")
    if y is None:
        return cond
    if y.ndim != 5 or y.shape[2] != total:
        raise CausalLayoutError(f"cond['y'] must be [B, C_y, F, H, W] with F = {total} frames (initial + generated), "
                                f"got {tuple(y.shape)}")
    return {**cond, "y": y[:, :, start:stop]}


@dataclass
class CallCounter:
    """Counts the net calls of a causal generation (`run_causal_blocks` adds one per call)."""

    calls: int = 0


def _predict(net, x, t_value, cond, cache, start, stop, total, counter) -> torch.Tensor:
    """x0 (fp32) of one KV-cache call of ``net`` on frames [start, stop)."""
    t = timestep_tensor(t_value, x)
    counter.calls += 1
    v = net(x, t, **block_cond(cond, start, stop, total), kv_cache=cache, frame_offset=start)
    return flow_to_x0(x, v, t)


def _write_context(net, x0, context_noise, cond, cache, start, stop, total, counter, generator, dtype) -> None:
    """Overwrite the cache slots of frames [start, stop) with the K/V of ``x0`` noised to ``context_noise``."""
    with torch.no_grad():
        x = x0.detach()
        if context_noise > 0:
            x = add_noise(x, randn_like(x, generator), timestep_tensor(context_noise, x))
        t = timestep_tensor(context_noise, x)
        counter.calls += 1
        net(x.to(dtype), t, **block_cond(cond, start, stop, total), kv_cache=cache, frame_offset=start)


def run_causal_blocks(net: FlowNet, noise: torch.Tensor, steps: Sequence[float], cond: Cond, layout: BlockLayout,
                      exits: Sequence[int], *, grad_from_frame: int, grad: bool, context_noise: float,
                      generator: torch.Generator | None, cache: KVCache, initial_latent: torch.Tensor | None,
                      counter: CallCounter) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """The block runner shared by the training rollout (`causal_rollout`) and streaming generation
    (`sfplus.sampling.streaming.causal_generate`); take its inputs from `prepare_causal_generation`.

    Args:
        noise: [B, C, F, H, W] noise of the generated frames; steps: the positive few-step timesteps.
        layout: the block layout; exits: the exit step of each generated block.
        grad_from_frame, grad: blocks starting at or after this frame run their exit step with grad when ``grad``.
        context_noise: timestep of the context refresh; generator: source of re-noising and context noise.
        cache: a fresh KV cache; initial_latent: [B, C, F0, H, W] context frames written first (or None).
        counter: counts the net calls.

    Yields ``((start, stop), x0_block)`` for each generated block as soon as its exit step is done; the block's
    context refresh runs when the consumer asks for the next block. The last block gets no refresh: no later block
    would read it (the reference runs it anyway: one wasted net call per video). No autograd mode is held across a
    yield.
    """
    total, dtype = layout.total_frames, noise.dtype
    f0 = total - noise.shape[2]
    for a, b in layout.context:
        _write_context(net, initial_latent[:, :, a:b], context_noise, cond, cache, a, b, total, counter, generator,
                       dtype)
    last = len(layout.generated) - 1
    for i, ((a, b), k) in enumerate(zip(layout.generated, exits)):
        x = noise[:, :, a - f0:b - f0]
        with torch.no_grad():
            for j in range(k):
                x0 = _predict(net, x, steps[j], cond, cache, a, b, total, counter)
                x = add_noise(x0, randn_like(x0, generator), timestep_tensor(steps[j + 1], x0)).to(dtype)
        with torch.set_grad_enabled(grad and a >= grad_from_frame):
            x0 = _predict(net, x, steps[k], cond, cache, a, b, total, counter)
        yield (a, b), x0
        if i < last:
            _write_context(net, x0, context_noise, cond, cache, a, b, total, counter, generator, dtype)


def prepare_causal_generation(net: FlowNet, noise: torch.Tensor, timesteps: Sequence[float], frames_per_block: int,
                              independent_first_frame: bool, initial_latent: torch.Tensor | None,
                              context_noise: float, local_window_frames: int | None,
                              sink_frames: int) -> tuple[BlockLayout, list[float], KVCache]:
    """Validate a causal generation's inputs (CausalLayoutError); return its block layout, the positive timesteps
    (a trailing 0 dropped) and a fresh KV cache sized for it — the inputs of `run_causal_blocks`."""
    if noise.ndim != 5:
        raise CausalLayoutError(f"noise must be [B, C, F, H, W], got {tuple(noise.shape)}")
    b, c, _, h, w = noise.shape
    if initial_latent is not None and (initial_latent.ndim != 5 or tuple(initial_latent.shape[:2]) != (b, c)
                                       or tuple(initial_latent.shape[3:]) != (h, w)):
        raise CausalLayoutError(f"initial_latent must be [B={b}, C={c}, F0, H={h}, W={w}], "
                                f"got {tuple(initial_latent.shape)}")
    if not 0 <= context_noise < 1000:
        raise CausalLayoutError(f"context_noise must be in [0, 1000), got {context_noise}")
    layout = block_layout(noise.shape[2], frames_per_block, independent_first_frame=independent_first_frame,
                          initial_frames=0 if initial_latent is None else initial_latent.shape[2])
    layout.block_causal(frames_per_block, local_window_frames, sink_frames)  # window/sink vs block size check
    steps = _positive_steps(timesteps)
    cache = new_kv_cache(net, b, layout.total_frames, h, w, local_window_frames=local_window_frames,
                         sink_frames=sink_frames)
    return layout, steps, cache


@dataclass
class CausalRollout(Rollout):
    """What `causal_rollout` returns (a `Rollout` with per-block details).

    Attributes (beyond `Rollout`):
        x0: [B, C, F0 + F, H, W] fp32: the initial latent frames (as given) followed by each block's exit-step x0.
        exit_index: block 0's exit step.
        t_from, t_to: block 0's exit timestep and the one after it (0 after the last step), warped scale; None when
            the blocks' exit indices differ.
        exit_indices: the exit step of every generated block.
        context_frames: F0, the leading frames copied from ``initial_latent``.
        grad_from_frame: blocks starting before this frame ran without grad (0: every block could carry grad).
    """

    t_from: float | None
    t_to: float | None
    exit_indices: list[int]
    context_frames: int
    grad_from_frame: int


def causal_rollout(
    net: FlowNet,
    noise: torch.Tensor,
    timesteps: Sequence[float],
    cond: Cond,
    *,
    frames_per_block: int,
    exit_indices: int | Sequence[int],
    independent_first_frame: bool = False,
    context_noise: float = 0.0,
    generator: torch.Generator | None = None,
    grad: bool = True,
    initial_latent: torch.Tensor | None = None,
    grad_frames: int | None = None,
    local_window_frames: int | None = None,
    sink_frames: int = 0,
) -> CausalRollout:
    """Self-Forcing backward simulation of a causal WanDiT, with a fresh KV cache
    (docs/algorithms.md, 'Causal rollout (Self-Forcing)').

    Args:
        net: a WanDiT (called as ``net(x, t, context, clip_fea, y, kv_cache=..., frame_offset=k)``).
        noise: [B, C, F, H, W] starting noise of the generated frames.
        timesteps: the warped few-step list, e.g. [1000, 937.5, 833.33, 625] (a trailing 0 is ignored).
        cond: {"context", optional "clip_fea", optional "y" [B, C_y, F0 + F, H, W] (sliced per block)}.
        frames_per_block: latent frames per causal block (3 in Self-Forcing).
        exit_indices: exit step per generated block (`block_layout(...).generated` gives the blocks); one int means
            the same step for every block (``same_step_across_blocks``).
        independent_first_frame: frame 0 is its own block (see `block_layout`).
        context_noise: timestep at which each finished block is written back as context (0 = exactly clean).
        generator: source of the re-noising and context noise.
        grad: record a graph through the exit steps at all (only if autograd is enabled where this is called).
        initial_latent: [B, C, F0, H, W] given leading frames, written to the cache first (no grad).
        grad_frames: only blocks starting inside the last ``grad_frames`` frames (of F0 + F) get grad (the reference
            uses 21: the window the bidirectional critic sees); None = every block.
        local_window_frames, sink_frames: rolling attention window + sink (see `sfplus.nets.causal.KVCache`).

    Makes ``len(context blocks) + sum_b (exit_b + 1) + len(generated blocks)`` net calls.
    """
    layout, steps, cache = prepare_causal_generation(net, noise, timesteps, frames_per_block, independent_first_frame,
                                                     initial_latent, context_noise, local_window_frames, sink_frames)
    n_blocks = len(layout.generated)
    if isinstance(exit_indices, Sequence) or (torch.is_tensor(exit_indices) and exit_indices.ndim == 1):
        exits = [int(k) for k in exit_indices]
    else:  # one value for every block
        exits = [int(exit_indices)] * n_blocks
    if len(exits) != n_blocks:
        raise CausalLayoutError(f"exit_indices has {len(exits)} entries for {n_blocks} generated blocks")
    bad = [k for k in exits if not 0 <= k < len(steps)]
    if bad:
        raise CausalLayoutError(f"exit indices {bad} are outside the {len(steps)} denoising steps")
    if grad_frames is not None and grad_frames < 1:
        raise CausalLayoutError(f"grad_frames must be positive or None, got {grad_frames}")
    grad_from = 0 if grad_frames is None else max(0, layout.total_frames - grad_frames)

    counter = CallCounter()
    grad = grad and torch.is_grad_enabled()  # never switch grad on inside a caller's no_grad / inference_mode
    blocks = [x0 for _, x0 in run_causal_blocks(
        net, noise, steps, cond, layout, exits, grad_from_frame=grad_from, grad=grad, context_noise=context_noise,
        generator=generator, cache=cache, initial_latent=initial_latent, counter=counter)]
    if initial_latent is not None:
        blocks.insert(0, initial_latent.float())
    same = all(k == exits[0] for k in exits)
    k0 = exits[0]
    t_from = steps[k0] if same else None
    t_to = (steps[k0 + 1] if k0 + 1 < len(steps) else 0.0) if same else None
    return CausalRollout(torch.cat(blocks, dim=2), k0, t_from, t_to, counter.calls, exits,
                         layout.total_frames - noise.shape[2], grad_from)
