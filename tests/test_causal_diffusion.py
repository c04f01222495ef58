"""Many-step autoregressive sampling of a causal diffusion model (docs/algorithms.md, 'Causal diffusion sampler'),
against independent paths."""

from __future__ import annotations

import pytest
import torch

from sfplus.flow import timestep_tensor
from sfplus.nets.causal import BlockCausal
from sfplus.sampling.causal_diffusion import causal_diffusion_sample
from sfplus.sampling.samplers import euler_sigmas, teacher_sample
from sfplus.sampling.unipc import unipc_sample

B, C, H, W = 2, 16, 4, 4  # the tiny preset: 16 latent channels, patch 1x2x2
G = 2.5


def _conds(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = net.config
    cond = {"context": torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)}
    uncond = {"context": torch.zeros(B, cfg.text_len, cfg.text_dim)}
    return cond, uncond


def _noise(frames, seed=1):
    return torch.randn(B, C, frames, H, W, generator=torch.Generator().manual_seed(seed))


def test_one_block_is_the_plain_multistep_sampler(tiny_dit, one_thread):
    cond, uncond = _conds(tiny_dit)
    noise = _noise(2)
    ar = causal_diffusion_sample(tiny_dit, noise, cond, uncond, frames_per_block=2, num_steps=5, shift=3.0,
                                 guidance_scale=G)
    ref = teacher_sample(tiny_dit, noise, cond, uncond, num_steps=5, shift=3.0, guidance_scale=G)
    torch.testing.assert_close(ar, ref, atol=1e-5, rtol=1e-5)
    ar_u = causal_diffusion_sample(tiny_dit, noise, cond, uncond, frames_per_block=2, num_steps=4, shift=3.0,
                                   guidance_scale=G, sampler="unipc")
    ref_u = unipc_sample(tiny_dit, noise, cond, uncond, num_steps=4, shift=3.0, guidance_scale=G)
    torch.testing.assert_close(ar_u, ref_u, atol=1e-5, rtol=1e-5)


def test_later_blocks_see_the_finished_earlier_blocks_as_clean_context(tiny_dit, one_thread):
    """Block 1 against an Euler loop of the PARALLEL block-causal forward over [final block 0 at t=0; block 1]."""
    cond, uncond = _conds(tiny_dit)
    noise = _noise(4)
    steps, shift = 4, 3.0
    ar = causal_diffusion_sample(tiny_dit, noise, cond, uncond, frames_per_block=2, num_steps=steps, shift=shift,
                                 guidance_scale=G)
    block0 = teacher_sample(tiny_dit, noise[:, :, :2], cond, uncond, num_steps=steps, shift=shift, guidance_scale=G)
    torch.testing.assert_close(ar[:, :, :2], block0, atol=1e-5, rtol=1e-5)

    mask = BlockCausal(frames_per_block=2, backend="sdpa")
    sigmas = euler_sigmas(steps, shift)
    x = noise[:, :, 2:].clone()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            both = torch.cat([block0, x], dim=2)
            t = torch.cat([torch.zeros(B, 2), timestep_tensor(1000.0 * s, x)], dim=1)
            v_c = tiny_dit(both, t, **cond, causal=mask)[:, :, 2:]
            v_u = tiny_dit(both, t, **uncond, causal=mask)[:, :, 2:]
            x = x + (s_next - s) * (v_u + G * (v_c - v_u))
    torch.testing.assert_close(ar[:, :, 2:], x, atol=1e-4, rtol=1e-4)


def test_blocks_are_causal_and_calls_are_counted(tiny_dit, one_thread):
    cond, uncond = _conds(tiny_dit)
    calls = []

    def counting(x, t, **kw):
        calls.append(x.shape[2])
        return tiny_dit(x, t, **kw)

    counting.config = tiny_dit.config
    noise = _noise(6)
    out = causal_diffusion_sample(counting, noise, cond, uncond, frames_per_block=2, num_steps=3, shift=3.0,
                                  guidance_scale=G)
    assert out.shape == (B, C, 6, H, W)
    # 3 blocks x 3 steps x 2 (CFG) solver calls + 2 context writes x 2 caches (no write after the last block).
    assert len(calls) == 3 * 3 * 2 + 2 * 2 and set(calls) == {2}
    later = noise.clone()
    later[:, :, 4:] += 1.0  # change only the last block's noise
    out2 = causal_diffusion_sample(tiny_dit, later, cond, uncond, frames_per_block=2, num_steps=3, shift=3.0,
                                   guidance_scale=G)
    torch.testing.assert_close(out2[:, :, :4], out[:, :, :4], atol=1e-6, rtol=1e-6)
    assert (out2[:, :, 4:] - out[:, :, 4:]).abs().max() > 1e-3
    earlier = noise.clone()
    earlier[:, :, :2] += 1.0  # earlier context changes what follows
    out3 = causal_diffusion_sample(tiny_dit, earlier, cond, None, frames_per_block=2, num_steps=3, shift=3.0,
                                   guidance_scale=G)
    out4 = causal_diffusion_sample(tiny_dit, noise, cond, None, frames_per_block=2, num_steps=3, shift=3.0,
                                   guidance_scale=G)
    assert (out3[:, :, 2:] - out4[:, :, 2:]).abs().max() > 1e-3


def test_initial_latent_leads_the_video_and_bad_sampler_is_named(tiny_dit, one_thread):
    cond, uncond = _conds(tiny_dit)
    first = torch.randn(B, C, 1, H, W)
    out = causal_diffusion_sample(tiny_dit, _noise(2), cond, uncond, frames_per_block=2, num_steps=2, shift=3.0,
                                  guidance_scale=G, initial_latent=first)
    assert out.shape == (B, C, 3, H, W)
    assert torch.equal(out[:, :, :1], first)
    with pytest.raises(ValueError, match="sampler"):
        causal_diffusion_sample(tiny_dit, _noise(2), cond, uncond, frames_per_block=2, num_steps=2, shift=3.0,
                                guidance_scale=G, sampler="ddim")


def test_rolling_window_streams_past_the_window(tiny_dit, one_thread):
    """With a local window (+ sink) the sampler runs past the window; blocks inside the window are unchanged."""
    cond, uncond = _conds(tiny_dit)
    noise = _noise(8)
    kw = dict(frames_per_block=2, num_steps=2, shift=3.0, guidance_scale=G)
    full = causal_diffusion_sample(tiny_dit, noise, cond, uncond, **kw)
    windowed = causal_diffusion_sample(tiny_dit, noise, cond, uncond, local_window_frames=4, sink_frames=0, **kw)
    assert windowed.shape == full.shape and torch.isfinite(windowed).all()
    # A block ending at frame b sees frames [b - 4, b): blocks 0-1 see everything, block 2 no longer sees 0-1.
    torch.testing.assert_close(windowed[:, :, :4], full[:, :, :4], atol=1e-5, rtol=1e-5)
    assert (windowed[:, :, 4:6] - full[:, :, 4:6]).abs().max() > 1e-4
    # Two sink frames keep frames 0-1 visible: block 2 sees all of [0, 6) again; block 3 misses frames 2-3.
    sunk = causal_diffusion_sample(tiny_dit, noise, cond, uncond, local_window_frames=4, sink_frames=2, **kw)
    torch.testing.assert_close(sunk[:, :, :6], full[:, :, :6], atol=1e-5, rtol=1e-5)
    assert (sunk[:, :, 6:] - full[:, :, 6:]).abs().max() > 1e-4
