"""WanDiT causal modes: block-causal parallel forward == KV-cache stepping; windows, sinks, gradients, errors."""

import pytest
import torch

from sfplus.nets.causal import BlockCausal, KVCache, block_causal_mask, block_frame_ends
from sfplus.nets.presets import build_dit

H, W = 4, 4  # latent size -> 2x2 = 4 tokens per frame
S = (H // 2) * (W // 2)


def _model(name="tiny", seed=0):
    torch.manual_seed(seed)
    model = build_dit(name).eval()
    model.init_weights()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.2)
    return model


def _data(frames, b=2, seed=1, i2v=False):
    g = torch.Generator().manual_seed(seed)
    data = {
        "x": torch.randn(b, 16, frames, H, W, generator=g),
        "t": torch.rand(b, frames, generator=g) * 1000,  # per-frame timesteps
        "context": torch.randn(b, 5, 16, generator=g),
    }
    if i2v:
        data["clip_fea"] = torch.randn(b, 3, 16, generator=g)
        data["y"] = torch.randn(b, 20, frames, H, W, generator=g)
    return data


def _blocks(frames, causal):
    """(start, stop) frame ranges of the causal blocks."""
    ends = sorted(set(block_frame_ends(causal, frames)))
    return list(zip([0] + ends[:-1], ends))


def _step_all(model, data, causal, cache, rerun_with_noise=False):
    """Run the video block by block through the KV cache; returns the concatenated outputs."""
    outs = []
    for start, stop in _blocks(data["x"].shape[2], causal):
        kw = {"clip_fea": data.get("clip_fea")}
        if "y" in data:
            kw["y"] = data["y"][:, :, start:stop]
        if rerun_with_noise:  # a first pass with other input at the same offset must be fully overwritten
            model(torch.randn_like(data["x"][:, :, start:stop]), data["t"][:, start:stop] * 0.5, data["context"],
                  kv_cache=cache, frame_offset=start, **kw)
        outs.append(model(data["x"][:, :, start:stop], data["t"][:, start:stop], data["context"], kv_cache=cache,
                          frame_offset=start, **kw))
    return torch.cat(outs, dim=2)


def _cache(model, data, causal, max_frames=None):
    return KVCache(model.config, data["x"].shape[0], max_frames or data["x"].shape[2], S,
                   local_window_frames=causal.local_window_frames, sink_frames=causal.sink_frames)


@pytest.mark.parametrize(
    "causal,frames,name",
    [
        (BlockCausal(2), 6, "tiny"),
        (BlockCausal(1), 4, "tiny"),
        (BlockCausal(2, independent_first_frame=True), 5, "tiny"),
        (BlockCausal(2), 4, "tiny-i2v"),
    ],
)
@torch.no_grad()
def test_parallel_block_causal_equals_kv_cache_stepping(causal, frames, name):
    model = _model(name)
    data = _data(frames, i2v=name.endswith("i2v"))
    parallel = model(**data, causal=causal)
    stepped = _step_all(model, data, causal, _cache(model, data, causal), rerun_with_noise=True)
    torch.testing.assert_close(stepped, parallel, atol=1e-5, rtol=1e-5)
    # and it is really causal: changing the last frame leaves earlier blocks untouched
    data["x"][:, :, -1] += 1.0
    changed = model(**data, causal=causal)
    last_block_start = _blocks(frames, causal)[-1][0]
    torch.testing.assert_close(changed[:, :, :last_block_start], parallel[:, :, :last_block_start], atol=1e-6,
                               rtol=1e-6)
    assert (changed[:, :, last_block_start:] - parallel[:, :, last_block_start:]).abs().max() > 1e-4


@torch.no_grad()
def test_single_block_equals_full_attention():
    model = _model()
    data = _data(4)
    full = model(**data)
    torch.testing.assert_close(model(**data, causal=BlockCausal(4)), full, atol=1e-5, rtol=1e-5)
    cache = KVCache(model.config, 2, 4, S)
    torch.testing.assert_close(model(**data, kv_cache=cache), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "causal,frames",
    [
        (BlockCausal(1, local_window_frames=2, sink_frames=1), 6),
        (BlockCausal(2, local_window_frames=3, sink_frames=1), 8),
        (BlockCausal(2, local_window_frames=2), 6),
    ],
)
@torch.no_grad()
def test_local_window_and_sink_eviction_parallel_equals_cache(causal, frames):
    model = _model()
    data = _data(frames)
    parallel = model(**data, causal=causal)
    cache = _cache(model, data, causal)
    assert cache.slots == causal.sink_frames + causal.local_window_frames < frames  # the ring really wraps
    stepped = _step_all(model, data, causal, cache, rerun_with_noise=True)
    torch.testing.assert_close(stepped, parallel, atol=1e-5, rtol=1e-5)
    # the window matters: unrestricted block-causal attention gives a different result
    assert (model(**data, causal=BlockCausal(causal.frames_per_block)) - parallel).abs().max() > 1e-4


@torch.no_grad()
def test_flex_block_mask_equals_dense_sdpa_mask():
    model = _model()
    data = _data(6)
    for causal in (BlockCausal(2, backend="flex"), BlockCausal(1, local_window_frames=2, sink_frames=1,
                                                               backend="flex")):
        flex = model(**data, causal=causal)
        dense = model(**data, causal=BlockCausal(**{**causal.__dict__, "backend": "sdpa"}))
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert len(model._mask_cache) == 4  # one mask per (causal, shape), reused across calls


def test_causal_training_gradients_on_cpu():
    """The default backend ("auto") trains on CPU (flex has no CPU backward) and matches flex's forward."""
    model = _model()
    data = _data(4, b=1)
    assert BlockCausal(2).resolve_backend("cpu") == "sdpa" and BlockCausal(2).resolve_backend("cuda") == "flex"
    out = model(**data, causal=BlockCausal(2))
    out.square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(**data, causal=BlockCausal(2, backend="flex")), atol=1e-5, rtol=1e-5)


def test_dense_mask_pattern():
    mask = block_causal_mask(BlockCausal(2, local_window_frames=2, sink_frames=1, backend="sdpa"), 6, 2, "cpu")
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],  # block [2, 4): window frames 2..3 plus sink frame 0
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 1],
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)  # 2 tokens per frame
    assert torch.equal(mask, expected)
    assert block_frame_ends(BlockCausal(3, independent_first_frame=True), 7) == [1, 4, 4, 4, 7, 7, 7]


@torch.no_grad()
def test_per_frame_equal_t_equals_scalar_t_in_causal_modes():
    model = _model()
    data = _data(4)
    t_scalar = data["t"][:, 0]
    data["t"] = t_scalar[:, None].expand(2, 4)
    causal = BlockCausal(2)
    per_frame = model(**data, causal=causal)
    scalar = model(data["x"], t_scalar, data["context"], causal=causal)
    torch.testing.assert_close(per_frame, scalar, atol=1e-6, rtol=1e-6)


def test_kv_cache_gradients_stop_at_earlier_blocks():
    """K/V are stored detached: block 1's loss reaches block 1's input but not block 0's (no B22 leak)."""
    model = _model()
    data = _data(4, b=1)
    x0 = data["x"][:, :, :2].clone().requires_grad_(True)
    x1 = data["x"][:, :, 2:].clone().requires_grad_(True)
    cache = KVCache(model.config, 1, 4, S)
    out0 = model(x0, data["t"][:, :2], data["context"], kv_cache=cache, frame_offset=0)
    out1 = model(x1, data["t"][:, 2:], data["context"], kv_cache=cache, frame_offset=2)
    assert not any(k.requires_grad for k in cache.k + cache.v)
    grad0, grad1 = torch.autograd.grad(out1.square().sum(), (x0, x1), allow_unused=True)
    assert grad0 is None and grad1.abs().sum() > 0
    out0.square().sum().backward()  # block 0's own graph is intact
    assert model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0
    # same values as without grad
    with torch.no_grad():
        cache.reset()
        ref = [model(x, t, data["context"], kv_cache=cache, frame_offset=o)
               for x, t, o in ((x0, data["t"][:, :2], 0), (x1, data["t"][:, 2:], 2))]
    torch.testing.assert_close(out1, ref[1], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_cross_attention_cache_is_filled_once_and_reused():
    model = _model()
    data = _data(4)
    cache = KVCache(model.config, 2, 4, S)
    first = model(data["x"][:, :, :2], data["t"][:, :2], data["context"], kv_cache=cache)
    assert cache.has_cross()
    cached = cache.cross(0)[0].clone()
    # the cache is bound to its first context: a different context is ignored while grad is off
    again = model(data["x"][:, :, :2], data["t"][:, :2], torch.zeros_like(data["context"]), kv_cache=cache)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert torch.equal(cache.cross(0)[0], cached)
    cache.reset()
    assert not cache.has_cross() and cache.end_frame == 0


@torch.no_grad()
def test_kv_cache_errors():
    model = _model()
    data = _data(4)
    cache = KVCache(model.config, 2, 4, S)
    x, t, ctx = data["x"], data["t"], data["context"]
    with pytest.raises(ValueError, match="without gaps"):
        model(x[:, :, :1], t[:, :1], ctx, kv_cache=cache, frame_offset=1)
    with pytest.raises(ValueError, match="max_frames"):
        model(x, t, ctx, kv_cache=KVCache(model.config, 2, 3, S))
    with pytest.raises(ValueError, match="tokens/frame"):
        model(x, t, ctx, kv_cache=KVCache(model.config, 2, 4, S + 1))
    with pytest.raises(ValueError, match="not both"):
        model(x, t, ctx, kv_cache=cache, causal=BlockCausal(1))
    windowed = KVCache(model.config, 2, 8, S, local_window_frames=2)
    for start in range(3):
        model(x[:, :, start:start + 1], t[:, start:start + 1], ctx, kv_cache=windowed, frame_offset=start)
    with pytest.raises(ValueError, match="evicted"):
        model(x[:, :, :1], t[:, :1], ctx, kv_cache=windowed, frame_offset=1)
    with pytest.raises(ValueError, match="local_window_frames"):
        BlockCausal(3, local_window_frames=2)
    with pytest.raises(ValueError, match="needs local_window_frames"):
        BlockCausal(1, sink_frames=1)


def test_kv_cache_is_safe_under_activation_checkpointing():
    """Self-Forcing pattern: grad-enabled exit step, no-grad clean re-run at the same offset, next block, then
    backward. Recomputation must see the K/V of the original forward and must not write into the cache."""
    from torch.utils.checkpoint import checkpoint

    def run(model):
        data = _data(4, b=1, seed=3)
        x, t, ctx = data["x"], data["t"], data["context"]
        cache = KVCache(model.config, 1, 4, S)
        with torch.no_grad():
            model(x[:, :, :2], t[:, :2], ctx, kv_cache=cache, frame_offset=0)
        out = model(x[:, :, 2:], t[:, 2:], ctx, kv_cache=cache, frame_offset=2)  # exit step, with grad
        with torch.no_grad():
            model(x[:, :, 2:] * 0.5, torch.zeros_like(t[:, 2:]), ctx, kv_cache=cache, frame_offset=2)  # clean pass
            snapshot = [k.clone() for k in cache.k]
        out.square().mean().backward()
        assert all(torch.equal(a, b) for a, b in zip(snapshot, cache.k))  # backward left the cache alone
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = _model()
    ref_out, ref_grads = run(plain)
    ckpt = _model()
    for block in ckpt.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)
    out, grads = run(ckpt)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_inference_reads_the_cache_in_place_and_matches_the_grad_path():
    """Without grad, a block attends to a slice of the cache (no concatenated copy) with the same result."""
    from sfplus.nets.causal import KVCacheStep

    model = _model()
    data = _data(6)
    causal = BlockCausal(2)
    seen = []
    original = KVCacheStep.update

    def spy(self, layer, k, v):
        keys, values = original(self, layer, k, v)
        buffer = self.cache.k[layer]
        seen.append(keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr())
        return keys, values

    KVCacheStep.update = spy
    try:
        with torch.no_grad():
            fast = _step_all(model, data, causal, _cache(model, data, causal))
        in_place, seen[:] = list(seen), []
        with torch.enable_grad():
            slow = _step_all(model, data, causal, _cache(model, data, causal)).detach()
    finally:
        KVCacheStep.update = original
    assert all(in_place) and not any(seen)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)


def test_rewriting_a_read_frame_before_backward_is_an_error():
    """The grad path keeps views of past frames: rewriting them before the recompute must fail loudly."""
    from torch.utils.checkpoint import checkpoint

    model = _model()
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)
    data = _data(4, b=1, seed=3)
    x, t, ctx = data["x"], data["t"], data["context"]
    cache = KVCache(model.config, 1, 4, S)
    with torch.no_grad():
        model(x[:, :, :2], t[:, :2], ctx, kv_cache=cache, frame_offset=0)
    out = model(x[:, :, 2:], t[:, 2:], ctx, kv_cache=cache, frame_offset=2)  # reads frames 0, 1
    with torch.no_grad():
        model(x[:, :, :2] * 0.5, t[:, :2], ctx, kv_cache=cache, frame_offset=0)  # rewrites them
    with pytest.raises(RuntimeError, match=r"frames \[0, 1\] were rewritten"):
        out.square().mean().backward()
