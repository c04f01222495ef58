"""sfplus.datamodules.samplers: explicit rank split, (seed, epoch)-only order, exact mid-epoch resume."""

import pytest
import torch

from sfplus.datamodules.samplers import EpochBatchSampler, EvenSplitSampler


def _epoch(length, bs, *, rank, world=2, seed=0, epoch=0, skip=0, **kw):
    s = EpochBatchSampler(length, bs, seed=seed, rank=rank, world_size=world, **kw)
    s.set_epoch(epoch)
    s.skip_batches = skip
    return list(s)


# ---- EpochBatchSampler -----------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_ranks_disjoint_and_cover_epoch(epoch):
    r0 = _epoch(24, 3, rank=0, epoch=epoch, seed=7)
    r1 = _epoch(24, 3, rank=1, epoch=epoch, seed=7)
    assert len(r0) == len(r1) == 4
    assert all(len(b) == 3 for b in r0 + r1)
    a = [i for b in r0 for i in b]
    b = [i for b in r1 for i in b]
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(24))  # one pass: every sample exactly once


def test_uneven_length_same_batch_count_and_full_coverage():
    # 10 samples, 2 ranks x 2 per batch: 3 batches per rank, the 2 extra slots wrap into the next permutation.
    r0 = _epoch(10, 2, rank=0, seed=1)
    r1 = _epoch(10, 2, rank=1, seed=1)
    assert len(r0) == len(r1) == 3
    assert all(len(b) == 2 for b in r0 + r1)
    flat = [i for b in r0 + r1 for i in b]
    assert set(flat) == set(range(10)) and len(flat) == 12


def test_order_depends_only_on_seed_and_epoch():
    torch.manual_seed(0)
    a = _epoch(50, 4, rank=1, seed=3, epoch=2)
    torch.manual_seed(12345)  # global RNG state must not matter
    torch.rand(100)
    b = _epoch(50, 4, rank=1, seed=3, epoch=2)
    assert a == b
    assert a != _epoch(50, 4, rank=1, seed=3, epoch=3)
    assert a != _epoch(50, 4, rank=1, seed=4, epoch=2)


def test_epochs_are_different_permutations_with_many_batches():
    # batches_per_epoch larger than a pass: the order continues into further permutations.
    e0 = _epoch(6, 2, rank=0, world=1, seed=0, epoch=0, batches_per_epoch=7)
    e1 = _epoch(6, 2, rank=0, world=1, seed=0, epoch=1, batches_per_epoch=7)
    assert len(e0) == len(e1) == 7
    flat0 = [i for b in e0 for i in b]
    assert sorted(flat0[:6]) == list(range(6)) and sorted(flat0[6:12]) == list(range(6))
    assert e0 != e1
    s = EpochBatchSampler(6, 2, batches_per_epoch=7, rank=0, world_size=1)
    assert len(s) == 7


@pytest.mark.parametrize("skip", [0, 1, 3, 6])
def test_skip_batches_resumes_exactly(skip):
    for rank in (0, 1):
        full = _epoch(40, 3, rank=rank, seed=9, epoch=4)
        resumed = _epoch(40, 3, rank=rank, seed=9, epoch=4, skip=skip)
        assert resumed == full[skip:]


def test_skip_applies_once_then_the_stream_continues():
    s = EpochBatchSampler(20, 2, seed=0, rank=0, world_size=2)
    full = list(s)
    s.set_epoch(0)
    s.skip_batches = 2
    assert list(s) == full[2:]
    # The next iteration is the next epoch, not a replay: the position only moves forward.
    nxt = list(s)
    assert len(nxt) == len(full) and nxt != full
    s.set_epoch(1)
    assert list(s) == nxt


def test_position_is_a_global_batch_index():
    a = EpochBatchSampler(10, 3, seed=4, rank=1, world_size=2, batches_per_epoch=2)
    b = EpochBatchSampler(10, 3, seed=4, rank=1, world_size=2, batches_per_epoch=2)
    stream = list(a) + list(a) + list(a)  # epochs 0, 1, 2
    b.position = 3  # mid-epoch 1, as a resumed run sets it
    assert list(b) + list(b) == stream[3:]


def test_len_and_no_shuffle():
    s = EpochBatchSampler(10, 3, shuffle=False, rank=1, world_size=2)
    assert len(s) == 2
    assert list(s) == [[3, 4, 5], [9, 0, 1]]  # dataset order, rank 1 takes rows 3..5 of each global batch, wrapped


def test_epoch_sampler_rejects_bad_args():
    with pytest.raises(ValueError):
        EpochBatchSampler(0, 2)
    with pytest.raises(ValueError):
        EpochBatchSampler(5, 0)


# ---- EvenSplitSampler ------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, bs", [(10, 2), (7, 3), (2, 4), (9, 3), (1, 1)])
def test_even_split_every_index_once(length, bs):
    world = 3
    per_rank = [list(EvenSplitSampler(length, bs, rank=r, world_size=world)) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1  # same number of batches on every rank
    assert all(len(batch) == bs for batches in per_rank for batch in batches)
    flat = [i for batches in per_rank for batch in batches for i in batch]
    real = [i for i in flat if i != -1]
    assert sorted(real) == list(range(length))
    assert all(i == -1 or 0 <= i < length for i in flat)


def test_even_split_layout():
    batches = [list(EvenSplitSampler(7, 2, rank=r, world_size=3)) for r in range(3)]
    assert batches == [
        [[0, 3], [6, -1]],
        [[1, 4], [-1, -1]],
        [[2, 5], [-1, -1]],
    ]
    assert len(EvenSplitSampler(7, 2, rank=2, world_size=3)) == 2


def test_even_split_empty_and_bad_batch():
    assert list(EvenSplitSampler(0, 2, rank=0, world_size=2)) == []
    with pytest.raises(ValueError):
        EvenSplitSampler(5, 0)


def test_workers_start_from_a_fork_server_by_default():
    """Forking a training process with communication threads can deadlock the child: workers come from a fork
    server unless the data module says otherwise; no workers, no context."""
    from sfplus.datamodules import LatentShardDataModule, PromptDataModule
    from sfplus.datamodules.samplers import worker_context

    assert worker_context(0) is None and worker_context(2) == "forkserver" and worker_context(2, "spawn") == "spawn"
    with pytest.raises(ValueError, match="worker_start_method"):
        worker_context(2, "thread")
    assert PromptDataModule("p.txt", num_workers=2).worker_context == "forkserver"
    assert LatentShardDataModule("shards", num_workers=2, worker_start_method="fork").worker_context == "fork"
