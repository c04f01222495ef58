"""Parallel teacher forcing: WanDiT on [clean frames ; noisy frames] in one call (docs/wan_architecture.md,
'Teacher-forcing mode')."""

from __future__ import annotations

import pytest
import torch

from sfplus.nets.causal import BlockCausal, teacher_forcing_mask
from sfplus.objectives.causvid import teacher_forced_x0

B, C, F, H, W = 2, 16, 5, 4, 4


def _inputs(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = net.config
    return (torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g),
            torch.rand(B, F, generator=g) * 1000, torch.rand(B, F, generator=g) * 200,
            {"context": torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)})


def test_mask_layout_by_hand():
    # Frame 0 alone, then blocks {1, 2}; one token per frame. Rows: queries [c0 c1 c2 n0 n1 n2], columns: keys.
    mask = teacher_forcing_mask(BlockCausal(2, independent_first_frame=True, backend="sdpa"), 3, 1, "cpu")
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # clean 0: clean block 0
        [1, 1, 1, 0, 0, 0],  # clean 1: clean blocks 0..1 (its block is frames 1-2)
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],  # noisy 0: only itself (no earlier block)
        [1, 0, 0, 0, 1, 1],  # noisy 1: clean block 0 + its own noisy block
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="local_window_frames"):
        teacher_forcing_mask(BlockCausal(2, local_window_frames=2, backend="sdpa"), 3, 1, "cpu")


@pytest.mark.parametrize("first_alone", [False, True])
def test_parallel_call_equals_block_by_block_kv_cache(tiny_dit, one_thread, first_alone):
    clean, noisy, t, ct, cond = _inputs(tiny_dit)
    frames = F if first_alone else F - 1  # 1 + 2 + 2, or 2 + 2
    clean, noisy, t, ct = clean[:, :, :frames], noisy[:, :, :frames], t[:, :frames], ct[:, :frames]
    parallel = BlockCausal(2, independent_first_frame=first_alone, backend="sdpa")
    # A window as long as the video changes no attention but takes the block-by-block KV-cache path.
    stepped = BlockCausal(2, independent_first_frame=first_alone, local_window_frames=frames, backend="sdpa")
    with torch.no_grad():
        a = teacher_forced_x0(tiny_dit, clean, noisy, t, cond, parallel, context_t=ct)
        b = teacher_forced_x0(tiny_dit, clean, noisy, t, cond, stepped, context_t=ct)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_each_noisy_block_sees_earlier_clean_blocks_and_itself_only(tiny_dit, one_thread):
    clean, noisy, t, ct, cond = _inputs(tiny_dit)
    causal = BlockCausal(2, independent_first_frame=True, backend="sdpa")  # blocks {0}, {1, 2}, {3, 4}

    def run(c, n):
        with torch.no_grad():
            return tiny_dit(n, t, **cond, causal=causal, clean_x=c, clean_t=ct)

    base = run(clean, noisy)
    changed = lambda x, a, b: torch.cat([x[:, :, :a], x[:, :, a:b] + 1.0, x[:, :, b:]], dim=2)  # noqa: E731
    out = run(changed(clean, 1, 3), noisy)  # clean block {1, 2}: seen by block {3, 4} only
    torch.testing.assert_close(out[:, :, :3], base[:, :, :3])
    assert (out[:, :, 3:] - base[:, :, 3:]).abs().max() > 1e-4
    out = run(clean, changed(noisy, 1, 3))  # noisy block {1, 2}: nobody else sees it
    torch.testing.assert_close(out[:, :, [0, 3, 4]], base[:, :, [0, 3, 4]])
    assert (out[:, :, 1:3] - base[:, :, 1:3]).abs().max() > 1e-4


def test_gradient_reaches_the_clean_context(tiny_dit, one_thread):
    """Reference semantics: the loss on a block trains the net through the clean context's keys/values too."""
    clean, noisy, t, _, cond = _inputs(tiny_dit)
    clean.requires_grad_(True)
    causal = BlockCausal(2, independent_first_frame=True, backend="sdpa")
    v = tiny_dit(noisy, t, **cond, causal=causal, clean_x=clean)
    v[:, :, 1:3].square().mean().backward()  # loss on noisy block {1, 2}
    g = clean.grad.abs().amax(dim=(0, 1, 3, 4))  # per frame
    assert g[0] > 0 and torch.all(g[1:] == 0)


def test_teacher_forcing_errors_name_the_problem(tiny_dit):
    clean, noisy, t, _, cond = _inputs(tiny_dit)
    with pytest.raises(ValueError, match="needs causal"):
        tiny_dit(noisy, t, **cond, clean_x=clean)
    with pytest.raises(ValueError, match="must match"):
        tiny_dit(noisy, t, **cond, causal=BlockCausal(1, backend="sdpa"), clean_x=clean[:, :, :3])
    with pytest.raises(ValueError, match="clean_t"):
        tiny_dit(noisy, t, **cond, causal=BlockCausal(1, backend="sdpa"), clean_x=clean, clean_t=torch.zeros(B, 2))


def test_flex_block_mask_equals_the_dense_mask(tiny_dit, one_thread):
    """The flex-attention BlockMask (the CUDA path) computes what the dense SDPA mask does (forward, on CPU)."""
    clean, noisy, t, ct, cond = _inputs(tiny_dit)
    with torch.no_grad():
        dense = tiny_dit(noisy, t, **cond, causal=BlockCausal(2, True, backend="sdpa"), clean_x=clean, clean_t=ct)
        flex = tiny_dit(noisy, t, **cond, causal=BlockCausal(2, True, backend="flex"), clean_x=clean, clean_t=ct)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
