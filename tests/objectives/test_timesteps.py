"""sfplus.objectives.timesteps: per-block step indices (docs/algorithms.md, 'Per-block timesteps')."""

import pytest
import torch

from sfplus.noise import SampleNoise
from sfplus.objectives.timesteps import (
    block_ranges,
    block_step_indices,
    block_training_timesteps,
    expand_blocks,
    gather_steps,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("frames,fpb,first,expected", [
    (6, 3, False, [(0, 3), (3, 6)]),
    (7, 3, True, [(0, 1), (1, 4), (4, 7)]),
    (5, 2, False, [(0, 2), (2, 4), (4, 5)]),  # shorter last block, as BlockCausal
    (4, 1, False, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_block_ranges(frames, fpb, first, expected):
    assert block_ranges(frames, frames_per_block=fpb, independent_first_frame=first) == expected


@pytest.mark.parametrize("fpb,first,frames", [(3, False, 9), (3, True, 10), (2, False, 5)])
def test_indices_constant_within_blocks_and_vary_across(fpb, first, frames):
    k = block_step_indices(64, frames, 4, frames_per_block=fpb, independent_first_frame=first, generator=_gen())
    assert k.shape == (64, frames) and k.dtype == torch.long
    assert int(k.min()) == 0 and int(k.max()) == 3  # the whole range U{0..3} is used
    ranges = block_ranges(frames, frames_per_block=fpb, independent_first_frame=first)
    for start, stop in ranges:
        assert torch.equal(k[:, start:stop], k[:, start:start + 1].expand(-1, stop - start))
    # different blocks (and samples) draw independently: not all equal to the first block
    firsts = torch.stack([k[:, s] for s, _ in ranges], dim=1)
    assert (firsts != firsts[:, :1]).any()
    assert (k[:, 0] != k[0, 0]).any()


def test_indices_roughly_uniform_and_reproducible():
    k = block_step_indices(4000, 2, 4, frames_per_block=1, generator=_gen(3))
    counts = torch.bincount(k.flatten(), minlength=4).float() / k.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    assert torch.equal(k, block_step_indices(4000, 2, 4, frames_per_block=1, generator=_gen(3)))


def test_sample_noise_streams_do_not_depend_on_batch_split():
    full = block_step_indices(4, 6, 5, frames_per_block=2, generator=SampleNoise([10, 11, 12, 13]))
    half = block_step_indices(2, 6, 5, frames_per_block=2, generator=SampleNoise([12, 13]))
    assert torch.equal(full[2:], half)


def test_block_training_timesteps():
    t = block_training_timesteps(16, 7, frames_per_block=3, independent_first_frame=True, shift=5.0,
                                 generator=_gen(1))
    assert t.shape == (16, 7) and t.dtype == torch.float32
    assert float(t.min()) > 0 and float(t.max()) <= 1000
    assert torch.equal(t[:, 1:4], t[:, 1:2].expand(-1, 3)) and torch.equal(t[:, 4:], t[:, 4:5].expand(-1, 3))
    assert (t[:, 0] != t[:, 1]).any()


def test_expand_blocks_and_errors():
    per_block = torch.tensor([[1, 2, 3]])
    assert expand_blocks(per_block, 5, frames_per_block=2, independent_first_frame=True).tolist() == [[1, 2, 2, 3, 3]]
    with pytest.raises(ValueError, match="per-block values"):
        expand_blocks(per_block, 4, frames_per_block=2, independent_first_frame=False)
    with pytest.raises(ValueError, match="num_steps"):
        block_step_indices(2, 4, 0, frames_per_block=2)
    with pytest.raises(ValueError, match="frames_per_block"):
        block_step_indices(2, 4, 3, frames_per_block=0)


def test_gather_steps():
    stack = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4, 1, 1).expand(2, 3, 2, 4, 2, 2)
    index = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    out = gather_steps(stack, index)
    assert out.shape == (2, 2, 4, 2, 2)
    for b in range(2):
        for f in range(4):
            assert torch.equal(out[b, :, f], stack[b, index[b, f], :, f])
    with pytest.raises(ValueError, match="out of range"):
        gather_steps(stack, index + 1)
    with pytest.raises(ValueError, match=r"\[B=2, F=4\]"):
        gather_steps(stack, index[:, :3])
