"""sfplus.sampling.streaming: causal few-step generation block by block, and block-by-block decoding
(docs/algorithms.md, 'Causal few-step sampler')."""

import pytest
import torch

from sfplus.flow import flow_to_x0
from sfplus.nets.causal import BlockCausal
from sfplus.nets.codec import IdentityCodec, WanVAECodec
from sfplus.nets.vae import WanVAE
from sfplus.rollout.causal import CausalLayoutError, causal_rollout
from sfplus.sampling.streaming import causal_generate, causal_sample, stream_video

STEPS = [1000.0, 937.5, 1000.0 * 5 / 6, 625.0]
B, C, H, W = 2, 16, 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(tiny_dit):
    return tiny_dit


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


COND = {"context": _randn(B, 5, 16, seed=5)}


def test_blocks_stream_in_order_and_match_the_full_sample(net):
    noise = _randn(B, C, 7, H, W)
    kw = dict(frames_per_block=2, independent_first_frame=True)
    stream = causal_generate(net, noise, STEPS, COND, generator=_gen(), **kw)
    first = next(stream)  # available before the rest is computed
    assert first.shape == (B, C, 1, H, W) and torch.is_grad_enabled()  # no grad mode leaks out of the generator
    blocks = [first] + list(stream)
    assert [b.shape[2] for b in blocks] == [1, 2, 2, 2]
    full = causal_sample(net, noise, STEPS, COND, generator=_gen(), **kw)
    assert torch.equal(torch.cat(blocks, dim=2), full) and not full.requires_grad
    # the sampler is the training rollout run to the last step of every block
    rollout = causal_rollout(net, noise, STEPS, COND, exit_indices=3, grad=False, generator=_gen(), **kw)
    assert torch.equal(rollout.x0, full)


def test_blocks_times_steps_plus_refreshes_calls(net):
    calls = []
    handle = net.register_forward_pre_hook(lambda m, a: calls.append(a[1][0, 0].item()))
    try:
        causal_sample(net, _randn(B, C, 6, H, W), STEPS + [0.0], COND, frames_per_block=2, generator=_gen())
    finally:
        handle.remove()
    assert len(calls) == 3 * (4 + 1) - 1
    # 4 steps, then the clean-context refresh at t=0, except after the last block (no block reads it)
    assert calls == pytest.approx((STEPS + [0.0]) * 2 + STEPS)


def test_frames_beyond_the_window_with_sink(net):
    """10 frames through a ring cache of sink 2 + window 4 = 6 frames; one step per block so that each block can be
    checked against a parallel block-causal forward with the same window and sink."""
    noise, t0 = _randn(B, C, 10, H, W, seed=3), 1000.0
    out = causal_sample(net, noise, [t0], COND, frames_per_block=2, local_window_frames=4, sink_frames=2)
    assert out.shape == (B, C, 10, H, W)
    causal = BlockCausal(2, local_window_frames=4, sink_frames=2)
    for start in range(0, 10, 2):
        x = torch.cat([out[:, :, :start], noise[:, :, start:]], dim=2)
        t = torch.zeros(B, 10)
        t[:, start:] = t0
        with torch.no_grad():
            want = flow_to_x0(x, net(x, t, **COND, causal=causal), t)[:, :, start:start + 2]
        torch.testing.assert_close(out[:, :, start:start + 2], want, atol=2e-5, rtol=2e-5)
    unlimited = causal_sample(net, noise, [t0], COND, frames_per_block=2)
    assert (unlimited[:, :, 8:] - out[:, :, 8:]).abs().max() > 1e-3  # the window really cut frames 2..5 off


def test_bad_layout_fails_at_call_time(net):
    with pytest.raises(CausalLayoutError, match="num_frames=5 is not a multiple of frames_per_block=2"):
        causal_generate(net, _randn(B, C, 5, H, W), STEPS, COND, frames_per_block=2)  # no iteration needed


def test_initial_latent_is_streamed_first(net):
    init = _randn(B, C, 1, H, W, seed=9)
    blocks = list(causal_generate(net, _randn(B, C, 4, H, W), STEPS, COND, frames_per_block=2, generator=_gen(),
                                  initial_latent=init))
    assert [b.shape[2] for b in blocks] == [1, 2, 2] and torch.equal(blocks[0], init)
    skipped = list(causal_generate(net, _randn(B, C, 4, H, W), STEPS, COND, frames_per_block=2, generator=_gen(),
                                   initial_latent=init, include_initial=False))
    assert len(skipped) == 2 and torch.equal(skipped[0], blocks[1])


def test_streamed_pixels_equal_one_decode_tiny_vae():
    torch.manual_seed(0)
    codec = WanVAECodec(WanVAE(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1).eval())
    latents = _randn(1, 16, 5, 2, 3, seed=4)
    blocks = [latents[:, :, :1], latents[:, :, 1:3], latents[:, :, 3:]]
    pixels = list(stream_video(iter(blocks), codec))
    assert [p.shape[2] for p in pixels] == [1, 8, 8]
    with torch.no_grad():
        whole = codec.decode(latents)
    torch.testing.assert_close(torch.cat(pixels, dim=2), whole, atol=1e-5, rtol=1e-5)


def test_stream_video_identity_codec_end_to_end(net):
    """Generation piped lazily into a streaming decode (the identity codec takes 3 channels: keep the first 3)."""
    cond = {"context": COND["context"][:1]}
    noise = _randn(1, C, 4, H, W)
    latents = causal_generate(net, noise, STEPS, cond, frames_per_block=2, generator=_gen())
    frames = list(stream_video((lat[:, :3] for lat in latents), IdentityCodec()))
    want = causal_sample(net, noise, STEPS, cond, frames_per_block=2, generator=_gen())[:, :3].clamp(-1, 1)
    assert len(frames) == 2 and torch.equal(torch.cat(frames, dim=2), want)
