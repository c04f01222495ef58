"""sfplus.rollout.causal: Self-Forcing rollout through the KV cache (docs/algorithms.md, 'Causal rollout
(Self-Forcing)'; reference bugs B1, B4, B22)."""

import pytest
import torch

from sfplus.flow import flow_to_x0
from sfplus.nets.causal import BlockCausal
from sfplus.nets.presets import build_dit
from sfplus.rollout.causal import CausalLayoutError, block_layout, causal_rollout, new_kv_cache

STEPS = [1000.0, 937.5, 1000.0 * 5 / 6, 625.0]
B, C, H, W = 2, 16, 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(tiny_dit):
    return tiny_dit


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cond(seed=5):
    return {"context": _randn(B, 5, 16, seed=seed)}


class CallLog:
    """Records every call of a net (x, t, frame_offset, grad enabled) and hooks each call's patch-embedding output to
    note which calls receive a nonzero gradient: the patch embedding feeds every layer's K/V, so a gradient leaking
    through the cache into an earlier forward would reach that forward's patch-embedding output."""

    def __init__(self, model):
        self.calls, self.grad_reached = [], set()
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.patch_embedding.register_forward_hook(self._patch),
        ]

    def _pre(self, module, args, kwargs):
        x, t = args[0], args[1]
        self.calls.append((x.detach().clone(), t.clone(), kwargs.get("frame_offset"), torch.is_grad_enabled()))

    def _patch(self, module, args, out):
        index = len(self.calls) - 1
        if out.requires_grad:
            # slicing a concatenation sends zeros to the other pieces: only a nonzero gradient counts
            out.register_hook(lambda g: self.grad_reached.add(index) if g.abs().max() > 0 else None)

    def close(self):
        for h in self._handles:
            h.remove()


def _mixed_parallel_block(net, clean_before, noise_from, t_value, start, stop, causal, cond):
    """What a KV-cache step over block [start, stop) must give when the cache holds clean frames [0, start) at t=0:
    one parallel block-causal forward on [clean frames | this block's noisy input] with per-frame timesteps
    [0 … 0 | t … t] — block-causal attention makes the earlier frames' keys exactly those of the clean context."""
    x = torch.cat([clean_before, noise_from], dim=2)
    t = torch.zeros(x.shape[0], x.shape[2])
    t[:, start:] = t_value
    with torch.no_grad():
        v = net(x, t, **cond, causal=causal)
    return flow_to_x0(x, v, t)[:, :, start:stop]


def test_block_layouts():
    lay = block_layout(6, 2)
    assert lay.generated == [(0, 2), (2, 4), (4, 6)] and lay.context == [] and not lay.first_frame_alone
    lay = block_layout(7, 3, independent_first_frame=True)
    assert lay.generated == [(0, 1), (1, 4), (4, 7)] and lay.first_frame_alone
    # an image latent: its own block (docs/algorithms.md, 'Causal rollout (Self-Forcing)')
    lay = block_layout(6, 3, initial_frames=1)
    assert lay.context == [(0, 1)] and lay.generated == [(1, 4), (4, 7)] and lay.first_frame_alone
    assert lay.total_frames == 7
    lay = block_layout(4, 2, initial_frames=4)
    assert lay.context == [(0, 2), (2, 4)] and lay.generated == [(4, 6), (6, 8)]
    with pytest.raises(CausalLayoutError, match="num_frames=7 is not a multiple of frames_per_block=3"):
        block_layout(7, 3)
    with pytest.raises(CausalLayoutError, match="1 \\+ k"):
        block_layout(6, 3, independent_first_frame=True)
    with pytest.raises(CausalLayoutError, match="initial latent of 4 frames"):
        block_layout(3, 3, initial_frames=4)


@pytest.mark.parametrize("exits", [[0, 0, 0], [2, 0, 3], [3, 3, 3]])
def test_call_counts_timesteps_offsets_and_grad_modes(net, exits):
    log = CallLog(net)
    try:
        r = causal_rollout(net, _randn(B, C, 6, H, W), STEPS + [0.0], _cond(), frames_per_block=2,
                           exit_indices=exits, generator=torch.Generator().manual_seed(1))
    finally:
        log.close()
    assert r.calls == len(log.calls) == sum(k + 1 for k in exits) + 2  # + a context refresh per block but the last
    assert r.x0.shape == (B, C, 6, H, W) and r.x0.dtype == torch.float32 and r.x0.requires_grad
    expected = []  # (t, frame_offset, grad) per call
    for block, k in enumerate(exits):
        expected += [(STEPS[j], 2 * block, j == k) for j in range(k + 1)]
        expected += [(0.0, 2 * block, False)] if block < len(exits) - 1 else []
    got = [(c[1][0, 0].item(), c[2], c[3]) for c in log.calls]
    assert [(pytest.approx(t), o, g) for t, o, g in expected] == got
    assert all(c[1].shape == (B, 2) for c in log.calls)
    assert r.exit_indices == exits and r.exit_index == exits[0] and r.context_frames == 0
    if len(set(exits)) == 1:
        k = exits[0]
        assert r.t_from == pytest.approx(STEPS[k]) and r.t_to == pytest.approx(STEPS[k + 1] if k < 3 else 0.0)
    else:
        assert r.t_from is None and r.t_to is None


def _logged_rollout(net, exits, seed):
    log = CallLog(net)
    r = causal_rollout(net, _randn(B, C, 6, H, W), STEPS, _cond(), frames_per_block=2, exit_indices=exits,
                       generator=torch.Generator().manual_seed(seed))
    return r, log


def test_gradient_flows_only_through_exit_calls_and_not_through_the_cache(net):
    """B22: a block's loss reaches only its own exit forward — never an earlier block's forward via the cache."""
    exits = [1, 2, 1]
    exit_calls = [1, 5, 8]  # per block: its no-grad steps, the exit call, the refresh
    r, log = _logged_rollout(net, exits, seed=2)
    try:
        assert [i for i, c in enumerate(log.calls) if c[3]] == exit_calls
        r.x0[:, :, 4:].square().sum().backward()
        assert log.grad_reached == {exit_calls[-1]}
        assert net.blocks[0].self_attn.q.weight.grad is not None
    finally:
        log.close()
        net.zero_grad()
    r, log = _logged_rollout(net, exits, seed=2)
    try:
        r.x0.square().sum().backward()
        assert log.grad_reached == set(exit_calls)
    finally:
        log.close()
        net.zero_grad()


def test_grad_frames_and_no_grad(net):
    log = CallLog(net)
    try:
        r = causal_rollout(net, _randn(B, C, 6, H, W), STEPS, _cond(), frames_per_block=2, exit_indices=1,
                           grad_frames=3, generator=torch.Generator().manual_seed(3))
        grads = [c[3] for c in log.calls]
        assert r.grad_from_frame == 3
        # only block [4, 6) starts inside the last 3 frames
        assert grads == [False] * 3 + [False] * 3 + [False, True]  # no refresh after the last block
        log.calls.clear()
        r = causal_rollout(net, _randn(B, C, 6, H, W), STEPS, _cond(), frames_per_block=2, exit_indices=1,
                           grad=False)
        assert not r.x0.requires_grad and not any(c[3] for c in log.calls)
        log.calls.clear()
        with torch.no_grad():  # grad=True does not switch autograd back on inside a caller's no_grad
            r = causal_rollout(net, _randn(B, C, 6, H, W), STEPS, _cond(), frames_per_block=2,
                               exit_indices=torch.tensor([0, 1, 2]))
        assert not r.x0.requires_grad and not any(c[3] for c in log.calls) and r.exit_indices == [0, 1, 2]
    finally:
        log.close()


@pytest.mark.parametrize("causal_kw", [dict(), dict(local_window_frames=2, sink_frames=2)])
def test_one_step_per_block_equals_parallel_block_causal(net, causal_kw):
    """Exit 0 everywhere: block b's output is the block-causal forward of [clean outputs < b | noise of b]."""
    noise, cond, t0 = _randn(B, C, 6, H, W, seed=4), _cond(), STEPS[1]
    r = causal_rollout(net, noise, STEPS[1:], cond, frames_per_block=2, exit_indices=0, **causal_kw)
    causal = BlockCausal(2, **causal_kw)
    for start in (0, 2, 4):
        want = _mixed_parallel_block(net, r.x0[:, :, :start].detach(), noise[:, :, start:], t0, start, start + 2,
                                     causal, cond)
        torch.testing.assert_close(r.x0[:, :, start:start + 2].detach(), want, atol=2e-5, rtol=2e-5)
    # the context matters: without the window (or with it) the result differs from a cache-less per-block forward
    with torch.no_grad():
        alone = flow_to_x0(noise[:, :, 4:], net(noise[:, :, 4:], torch.full((B, 2), t0), **cond), torch.tensor(t0))
    assert (alone - r.x0[:, :, 4:].detach()).abs().max() > 1e-3


def test_initial_latent_fills_the_cache(net):
    noise, cond, init = _randn(B, C, 4, H, W, seed=6), _cond(), _randn(B, C, 1, H, W, seed=7)
    log = CallLog(net)
    try:
        r = causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=0, initial_latent=init)
    finally:
        log.close()
    assert r.x0.shape == (B, C, 5, H, W) and r.context_frames == 1 and r.calls == 1 + 2 + 1
    assert torch.equal(r.x0[:, :, :1], init)
    first = log.calls[0]
    assert torch.equal(first[0], init) and first[1].eq(0).all() and first[2] == 0 and not first[3]
    causal = BlockCausal(2, independent_first_frame=True)  # the image frame is its own block
    for start in (1, 3):
        want = _mixed_parallel_block(net, r.x0[:, :, :start].detach(), noise[:, :, start - 1:], STEPS[0], start,
                                     start + 2, causal, cond)
        torch.testing.assert_close(r.x0[:, :, start:start + 2].detach(), want, atol=2e-5, rtol=2e-5)
    other = causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=0, initial_latent=init + 1)
    assert (other.x0[:, :, 1:] - r.x0[:, :, 1:]).abs().max() > 1e-3


def test_context_refresh_is_exactly_clean_at_zero_and_noised_otherwise(net):
    """B4: context_noise=0 feeds the exit x0 itself at t=0; context_noise>0 feeds add_noise(x0, eps, t_c) at t_c."""
    for cn in (0.0, 100.0):
        log = CallLog(net)
        try:
            r = causal_rollout(net, _randn(B, C, 4, H, W), STEPS, _cond(), frames_per_block=2, exit_indices=1,
                               context_noise=cn, generator=torch.Generator().manual_seed(8))
        finally:
            log.close()
        refresh = log.calls[2]
        assert refresh[1].eq(cn).all() and refresh[2] == 0
        block0 = r.x0[:, :, :2].detach()
        if cn == 0:
            assert torch.equal(refresh[0], block0)
        else:
            residual = refresh[0] - 0.9 * block0  # = 0.1 · eps
            assert 0.05 < residual.std() < 0.2


def test_cache_is_sized_from_the_config():
    """B1: layers/heads/head_dim come from the net, tokens per frame from the latent size."""
    model = build_dit("tiny", num_layers=3, num_heads=4)
    cache = new_kv_cache(model, 2, 7, 6, 10)
    assert (cache.num_layers, cache.num_heads, cache.head_dim) == (3, 4, 8)
    assert cache.tokens_per_frame == 15 and cache.max_frames == 7


def test_errors(net):
    noise, cond = _randn(B, C, 5, H, W), _cond()
    with pytest.raises(CausalLayoutError, match="num_frames=5 is not a multiple of frames_per_block=2"):
        causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=0)
    noise = _randn(B, C, 4, H, W)
    with pytest.raises(CausalLayoutError, match="3 entries for 2 generated blocks"):
        causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=[0, 1, 2])
    with pytest.raises(CausalLayoutError, match="outside the 4 denoising steps"):
        causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=[0, 4])
    with pytest.raises(CausalLayoutError, match="initial_latent must be"):
        causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=0,
                       initial_latent=_randn(B, C, 1, H, W + 2))
    with pytest.raises(CausalLayoutError, match="y"):
        causal_rollout(net, noise, STEPS, {**cond, "y": _randn(B, 20, 3, H, W)}, frames_per_block=2,
                       exit_indices=0)
    with pytest.raises(ValueError, match="local_window_frames=1 must be >= the block size 2"):
        causal_rollout(net, noise, STEPS, cond, frames_per_block=2, exit_indices=0, local_window_frames=1)
    with pytest.raises(CausalLayoutError, match="WanConfig"):
        causal_rollout(lambda x, t, **k: x, noise, STEPS, cond, frames_per_block=2, exit_indices=0)
    with pytest.raises(CausalLayoutError, match="decrease"):
        causal_rollout(net, noise, [625.0, 1000.0], cond, frames_per_block=2, exit_indices=0)
