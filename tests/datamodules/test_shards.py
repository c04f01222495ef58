"""Latent shards: format round trip, webdataset compatibility, rank split, exact resume, corrupt data, errors."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch

from sfplus.datamodules.shard_format import (
    EXT_LATENT,
    Sample,
    ShardFormatError,
    make_key,
    scan_shards,
    shard_sizes,
    write_shards,
)
from sfplus.datamodules.shards import LatentShardDataModule, LatentShardDataset, collate_shards

N = 11


def _samples(n: int = N, frames: int = 2, ode: bool = False, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = Sample(
            key=make_key(i, f"clip {i}.mp4"),
            prompt=f"prompt {i}: ünïcode ✓",
            latent=torch.randn(4, frames, 2, 3, generator=g),
            first_frame=torch.randint(0, 256, (3, 16, 24), generator=g, dtype=torch.uint8),
        )
        if ode:
            s.ode = torch.randn(3, 4, frames, 2, 3, generator=g)
            s.ode_timesteps = torch.tensor([1000.0, 888.9, 0.0])
        out.append(s)
    return out


@pytest.fixture
def shards(tmp_path) -> tuple[Path, list[Sample]]:
    samples = _samples()
    write_shards(samples, tmp_path / "shards", shard_sizes(N, samples_per_shard=4), info={"test": True})
    return tmp_path / "shards", samples


def test_round_trip_balanced_shards_and_index(shards):
    root, samples = shards
    index = json.loads((root / "index.json").read_text())
    assert [len(s["samples"]) for s in index["shards"]] == [4, 4, 3]  # balanced: sizes differ by at most 1
    assert index["num_samples"] == N and index["latent_shape"] == [4, 2, 2, 3] and index["dtype"] == "bfloat16"
    assert shard_sizes(10, num_shards=4) == [3, 3, 2, 2]
    ds = LatentShardDataset(root)
    assert len(ds) == N and ds.fields == ["latents", "first_frame"]
    for i in (0, 5, N - 1):
        item, s = ds[i], samples[i]
        assert item["prompts"] == s.prompt and item["key"] == s.key and item["corrupt"] == 0
        torch.testing.assert_close(item["latents"], s.latent.bfloat16().float())  # stored bf16, returned fp32
        torch.testing.assert_close(item["first_frame"], s.first_frame.float() / 127.5 - 1)


def test_shards_are_plain_webdataset_and_can_be_reindexed(shards, tmp_path):
    wds = pytest.importorskip("webdataset")
    root, samples = shards
    got = list(wds.WebDataset(str(root / "shard-000001.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples[4:8]]
    assert got[0]["txt"].decode() == samples[4].prompt

    # Shards written by webdataset's own writer (other members ignored) get an index from scan_shards.
    from sfplus.datamodules.shard_format import encode_sample

    other = tmp_path / "wds"
    other.mkdir()
    with wds.TarWriter(str(other / "data-0.tar")) as sink:
        for s in samples[:3]:
            sink.write({"__key__": s.key, "json": b"{}", **encode_sample(s)})
    index = scan_shards(other)
    assert index["num_samples"] == 3 and (other / "index.json").is_file()
    ds = LatentShardDataset(other)
    torch.testing.assert_close(ds[2]["latents"], samples[2].latent)  # encode_sample without dtype keeps fp32


def _epoch(dm: LatentShardDataModule, epoch: int, skip: int = 0) -> list[list[str]]:
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    loader.batch_sampler.skip_batches = skip
    return [b["keys"] for b in loader]


def test_explicit_rank_split_equal_batches_and_exact_resume(shards):
    root, _ = shards
    ranks = [LatentShardDataModule(str(root), batch_size=2, seed=7, num_workers=0, rank=r, world_size=2)
             for r in (0, 1)]  # fmt: skip
    e0 = [_epoch(dm, 0) for dm in ranks]
    assert len(e0[0]) == len(e0[1]) == 3  # ceil(11 / (2 ranks * 2)) batches each, the tail wraps around
    flat = [k for rank in e0 for batch in rank for k in batch]
    assert set(flat) == {make_key(i, f"clip {i}.mp4") for i in range(N)}
    first_pass = [k for b in range(3) for r in range(2) for k in e0[r][b]][:N]
    assert len(set(first_pass)) == N  # no sample twice before every sample was seen once
    assert _epoch(ranks[0], 1) != e0[0]  # a new order each epoch...
    assert _epoch(ranks[0], 0) == e0[0]  # ...a function of (seed, rank, epoch)
    assert _epoch(ranks[1], 0, skip=2) == e0[1][2:]  # resume mid-epoch: exactly the remaining batches
    other_seed = LatentShardDataModule(str(root), batch_size=2, seed=8, num_workers=0, rank=0, world_size=2)
    assert _epoch(other_seed, 0) != e0[0]


def test_worker_processes_read_the_same_batches(shards):
    root, _ = shards
    kw = dict(batch_size=3, seed=1, rank=0, world_size=1, batches_per_epoch=5)
    main = _epoch(LatentShardDataModule(str(root), num_workers=0, **kw), 0)
    workers = _epoch(LatentShardDataModule(str(root), num_workers=2, **kw), 0)
    assert workers == main and len(main) == 5


def _rank_main(rank: int, root: str, init: str, out: str) -> None:
    """One of two forked ranks: the split comes from torch.distributed, a DataLoader worker reads the shards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    # The ranks are forked from pytest: a forked process must not reuse its parent's fork server (multiprocessing
    # waits on workers that are not its children), so these workers fork too.
    dm = LatentShardDataModule(root, batch_size=2, seed=3, num_workers=1, worker_start_method="fork")
    result = {}
    for epoch in (0, 1):
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        result[epoch] = [b["keys"] for b in loader]
    dist.barrier()
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def test_two_processes_split_the_data(shards, tmp_path):
    import multiprocessing as mp

    root, _ = shards
    # Forked, not spawned: the children reuse this process's imports (a fresh interpreter spends seconds on them).
    ctx = mp.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank_main, args=(r, str(root), init, str(tmp_path / f"rank{r}.json"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = {make_key(i, f"clip {i}.mp4") for i in range(N)}
    for epoch in ("0", "1"):
        r0, r1 = results[0][epoch], results[1][epoch]
        assert len(r0) == len(r1) == 3
        assert not {k for b in r0[:2] for k in b} & {k for b in r1[:2] for k in b}  # disjoint before wrap-around
    # Epoch 0 covers every sample (12 rows of a stream of 11-sample passes).
    assert {k for r in results for b in r["0"] for k in b} == everything
    assert results[0]["0"] != results[0]["1"]


def _member(root: Path, shard: int, row: int, ext: str) -> tuple[Path, list[int]]:
    index = json.loads((root / "index.json").read_text())
    entry = index["shards"][shard]
    return root / entry["file"], entry["samples"][row][ext]


def test_corrupt_samples_are_replaced_counted_and_named(shards, caplog):
    root, samples = shards
    # Damage one latent's bytes (CRC), one tar header, and truncate the last shard inside its last sample.
    path, (offset, size, _) = _member(root, 0, 1, EXT_LATENT)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\xff" * 8)
    path, (offset, _, _) = _member(root, 1, 0, "txt")
    with open(path, "r+b") as f:
        f.seek(offset - 512 + 148)  # the header checksum field
        f.write(b"0000000\x00")
    path, (offset, _, _) = _member(root, 2, 2, EXT_LATENT)
    os.truncate(path, offset + 10)

    ds = LatentShardDataset(root, seed=5)
    bad = {1: samples[1].key, 4: samples[4].key, 10: samples[10].key}
    with caplog.at_level(logging.WARNING, logger="sfplus.datamodules.shards"):
        items = [ds[i] for i in range(N)]
    for i, item in enumerate(items):
        if i in bad:
            assert item["corrupt"] >= 1 and item["index"] not in bad and item["key"] != bad[i]
        else:
            assert item["corrupt"] == 0 and item["key"] == samples[i].key
    text = caplog.text
    assert "shard-000000.tar" in text and f"{samples[1].key}.latent.safetensors" in text and "CRC" in text
    assert "bad tar header" in text and "short read" in text
    assert "has" in text and "the index says" in text  # the truncated shard is noticed at construction
    # Replacement is deterministic, and the DataModule counts replaced samples from its batches.
    assert LatentShardDataset(root, seed=5)[1]["key"] == items[1]["key"]
    dm = LatentShardDataModule(str(root), batch_size=N, seed=0, num_workers=0, rank=0, world_size=1)
    batch = next(iter(dm.train_dataloader()))
    batch = dm.on_before_batch_transfer(batch, 0)
    assert "corrupt_samples" not in batch and dm.corrupt_samples == 3
    assert dm.state_dict() == {"corrupt_samples": 3}


def test_everything_broken_is_an_error_not_a_hang(shards):
    root, _ = shards
    for f in root.glob("*.tar"):
        f.write_bytes(b"\x00" * f.stat().st_size)
    with pytest.raises(ShardFormatError, match="all unreadable"):
        LatentShardDataset(root, max_attempts=4)[0]


def test_ode_shards_and_field_selection(tmp_path):
    write_shards(_samples(5, ode=True), tmp_path, [5], dtype=torch.float16)
    dm = LatentShardDataModule(str(tmp_path), batch_size=2, fields=["ode_latents"], dtype="bfloat16",
                               num_workers=0, rank=0, world_size=1)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompts", "keys", "index", "corrupt_samples", "ode_latents", "ode_timesteps"}
    assert batch["ode_latents"].shape == (2, 3, 4, 2, 2, 3) and batch["ode_latents"].dtype == torch.bfloat16
    torch.testing.assert_close(batch["ode_timesteps"], torch.tensor([[1000.0, 888.9, 0.0]] * 2))
    assert dm.ode_timesteps == pytest.approx([1000.0, 888.9, 0.0])


def test_clear_errors(tmp_path, shards):
    root, samples = shards
    with pytest.raises(ShardFormatError, match="nothing does not exist"):
        LatentShardDataset(tmp_path / "nothing")
    with pytest.raises(ShardFormatError, match="index.json not found.*--reindex"):
        LatentShardDataset(tmp_path)
    with pytest.raises(ShardFormatError, match=r"lack \['ode_latents'\]"):
        LatentShardDataset(root, fields=["ode_latents"])
    other = tmp_path / "other"
    write_shards(_samples(3, frames=3), other, [3])
    with pytest.raises(ShardFormatError, match="cannot be batched together"):
        LatentShardDataset([root, other])
    with pytest.raises(ShardFormatError, match="differs from the first sample"):
        write_shards([*_samples(2), Sample("zz", "p", latent=torch.zeros(4, 3, 2, 3))], tmp_path / "mixed", [3])
    with pytest.raises(ShardFormatError, match="must match"):
        Sample("a.b", "p", latent=torch.zeros(4, 1, 1, 1)).validate()
    (root / "shard-000001.tar").unlink()
    with pytest.raises(ShardFormatError, match="shard-000001.tar, which does not exist"):
        LatentShardDataset(root)
    items = [LatentShardDataset(other)[0], {**LatentShardDataset(other)[1]}]
    items[1]["latents"] = torch.zeros(4, 2, 2, 3)
    with pytest.raises(ShardFormatError, match="differ"):
        collate_shards(items)


def test_tar_members_have_fixed_metadata(shards):
    root, _ = shards
    with tarfile.open(root / "shard-000000.tar") as tar:
        infos = tar.getmembers()
    assert {(m.mtime, m.uid, m.mode) for m in infos} == {(0, 0, 0o644)}
    # webdataset.TarWriter writes a sample's members in sorted order.
    assert [m.name for m in infos[:3]] == [f"{make_key(0, 'clip 0.mp4')}.{e}"
                                           for e in ("first_frame.safetensors", "latent.safetensors", "txt")]


def test_lightning_fit_reads_shards_and_counts_corrupt_samples(tmp_path):
    import lightning as L

    from sfplus.modules import DiffusionModule

    g = torch.Generator().manual_seed(0)
    toy = [Sample(make_key(i), f"a red square moving left {i}", latent=torch.rand(3, 4, 16, 16, generator=g) * 2 - 1)
           for i in range(6)]  # fmt: skip
    write_shards(toy, tmp_path / "toy", [3, 3], dtype=torch.float32)
    path, (offset, size, _) = _member(tmp_path / "toy", 1, 0, EXT_LATENT)
    with open(path, "r+b") as f:
        f.seek(offset + size - 4)
        f.write(b"\x00\x01\x02\x03")
    dm = LatentShardDataModule(str(tmp_path / "toy"), batch_size=2, num_workers=0)
    module = DiffusionModule(net="toy", net_overrides={"num_layers": 1, "dim": 32, "ffn_dim": 32, "num_heads": 2})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step >= 3 and dm.corrupt_samples == 1  # one pass of 3 batches met the damaged sample
