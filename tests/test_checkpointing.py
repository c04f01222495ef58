"""Atomic checkpoints: temp name + rename for files and directories, crash safety, resume_path, the callback."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from sfplus.callbacks import EMA
from sfplus.callbacks.checkpointing import (
    AtomicCheckpoint,
    CheckpointPathError,
    atomic_save,
    backup_path,
    commit,
    partial_path,
    publish,
    recover,
    resume_path,
)
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import PromptDataModule
from sfplus.modules import DistillModule
from tests.helpers import TINY, write_tiny_teacher


class Crash(RuntimeError):
    pass


def write_file(content: bytes):
    """A small single-file checkpoint that loads (resume_path checks that it does), tagged with ``content``."""
    def save(path: Path) -> None:
        torch.save({"state_dict": {}, "content": content}, path)
    return save


def content_of(path: Path) -> bytes:
    return torch.load(path, weights_only=True)["content"]


def write_dir(tag: str, complete: bool = True):
    """A fake sharded save: shards first, then .metadata and meta.pt (as Lightning's ModelParallelStrategy); may
    die midway."""
    def save(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_text(f"shard0 {tag}")
        if not complete:
            raise Crash("killed while rank 1 was still writing")
        (path / "__1_0.distcp").write_text(f"shard1 {tag}")
        (path / ".metadata").write_text(f"index {tag}")
        torch.save({"tag": tag}, path / "meta.pt")
    return save


def tag_of(path: Path) -> str:
    return torch.load(path / "meta.pt", weights_only=True)["tag"]


def crash_midway(path: Path) -> None:
    path.write_bytes(b"half a checkp")
    raise Crash("killed mid-save")


def test_file_save_is_atomic_and_a_crash_keeps_the_previous_last(tmp_path):
    last = tmp_path / "last.ckpt"
    atomic_save(write_file(b"v1"), last)
    atomic_save(write_file(b"v2"), last)
    assert content_of(last) == b"v2"
    with pytest.raises(Crash):
        atomic_save(crash_midway, last)
    assert content_of(last) == b"v2", "the previous last.ckpt is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "the partial save was removed"
    assert resume_path(tmp_path) == str(last)


def test_directory_save_goes_through_the_same_rename(tmp_path):
    last = tmp_path / "last.ckpt"
    calls = []
    atomic_save(write_dir("v1"), last, barrier=lambda: calls.append("barrier"))
    assert calls == ["barrier"] * 3  # before saving, after every rank saved, after the rename
    atomic_save(write_dir("v2"), last)
    assert tag_of(last) == "v2" and (last / "__1_0.distcp").read_text() == "shard1 v2"
    with pytest.raises(Crash):
        atomic_save(write_dir("v3", complete=False), last)
    assert tag_of(last) == "v2" and (last / "__0_0.distcp").read_text() == "shard0 v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no .partial or .old left"


def test_non_zero_rank_only_saves(tmp_path):
    last = tmp_path / "last.ckpt"
    atomic_save(write_file(b"v1"), last)
    # Another rank writes its shard into the shared temp name but never renames or deletes.
    atomic_save(write_file(b"shard"), last, is_rank_zero=False)
    assert content_of(last) == b"v1" and content_of(partial_path(last)) == b"shard"


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    last = tmp_path / "last.ckpt"
    atomic_save(write_dir("v1"), last)
    # Simulate dying after "old -> backup" and before "new -> last": only the backup exists, plus the new partial.
    os.replace(last, backup_path(last))
    write_dir("v2")(partial_path(last))
    assert resume_path(tmp_path) == str(backup_path(last)), "resume still finds a complete checkpoint"
    assert recover(last) == last
    assert tag_of(last) == "v1"
    assert not backup_path(last).exists() and not partial_path(last).exists()


def test_commit_in_the_crash_window_keeps_the_backup_until_the_new_one_is_in_place(tmp_path):
    last = tmp_path / "last.ckpt"
    write_dir("v1")(backup_path(last))  # only the backup of an interrupted replacement exists
    write_dir("v2")(tmp_path / "new")
    commit(tmp_path / "new", last)
    assert tag_of(last) == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_commit_between_file_and_directory(tmp_path):
    last = tmp_path / "last.ckpt"
    write_file(b"file")(partial_path(last))
    commit(partial_path(last), last)
    write_dir("dir")(partial_path(last))
    commit(partial_path(last), last)
    assert tag_of(last) == "dir"
    write_file(b"file again")(partial_path(last))
    commit(partial_path(last), last)
    assert content_of(last) == b"file again"
    with pytest.raises(CheckpointPathError, match="produced nothing"):
        commit(partial_path(last), last)


def test_publish_links_without_a_second_write(tmp_path):
    periodic = tmp_path / "iteration-00000010.ckpt"
    atomic_save(write_file(b"state"), periodic)
    last = publish(periodic, tmp_path / "last.ckpt")
    assert os.stat(periodic).st_ino == os.stat(last).st_ino
    periodic.unlink()  # pruning the periodic name keeps last.ckpt
    assert content_of(last) == b"state"

    shards = tmp_path / "iteration-00000020.ckpt"
    atomic_save(write_dir("d"), shards)
    publish(shards, last)
    assert tag_of(last) == "d"
    assert os.stat(shards / "__0_0.distcp").st_ino == os.stat(last / "__0_0.distcp").st_ino
    with pytest.raises(CheckpointPathError, match="not a complete checkpoint"):
        publish(tmp_path / "missing.ckpt", last)


def test_resume_path_choices(tmp_path):
    assert resume_path(tmp_path / "nothing-yet") is None
    assert resume_path(tmp_path) is None
    (tmp_path / "iteration-00000100.ckpt").mkdir()  # a directory without meta.pt: never completed
    assert resume_path(tmp_path) is None
    atomic_save(write_file(b"a"), tmp_path / "iteration-00000200.ckpt")
    atomic_save(write_file(b"b"), tmp_path / "iteration-00000300.ckpt")
    assert resume_path(tmp_path) == str(tmp_path / "iteration-00000300.ckpt")
    atomic_save(write_file(b"c"), tmp_path / "last.ckpt")
    assert resume_path(tmp_path) == str(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointPathError, match="is a file"):
        resume_path(tmp_path / "last.ckpt")


def test_callback_arguments_are_validated():
    with pytest.raises(ValueError, match="every_n_iterations"):
        AtomicCheckpoint(every_n_iterations=0)
    with pytest.raises(ValueError, match="keep_last"):
        AtomicCheckpoint(keep_last=-1)


# ---- the callback on a real (tiny) run --------------------------------------------------------------------------


@pytest.fixture()
def tiny_run(tmp_path):
    teacher = write_tiny_teacher(tmp_path / "teacher.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a square moving {i}" for i in range(8)))

    def run(max_steps: int, callback: AtomicCheckpoint) -> tuple[DistillModule, L.Trainer]:
        module = DistillModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                               teacher_checkpoint=str(teacher), video_shape=[3, 2, 4, 4], dfake_gen_update_ratio=2)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                            default_root_dir=str(tmp_path / "root"), callbacks=[callback, EMA(decay=0.5)])
        trainer.fit(module, datamodule=PromptDataModule(str(prompts), batch_size=2))
        return module, trainer

    return run


def test_periodic_on_iteration_keep_last_and_final_last(tmp_path, tiny_run):
    ckpt_dir = tmp_path / "ckpt"
    callback = AtomicCheckpoint(dirpath=str(ckpt_dir), every_n_iterations=2, keep_last=1)
    module, trainer = tiny_run(8, callback)
    # Ratio 2, one update per batch: G C C G C C G C → iteration (critic updates) reaches 2 at batch 3 and 4 at
    # batch 6, and ends at 5 after 8 batches (global_step 8).
    assert module.iteration == 5 and trainer.global_step == 8
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["iteration-00000004.ckpt", "last.ckpt"]
    periodic = torch.load(ckpt_dir / "iteration-00000004.ckpt", weights_only=True)
    assert periodic["sfplus"]["counters"]["iteration"] == 4 and periodic["global_step"] == 6
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert last["sfplus"]["counters"]["iteration"] == 5 and last["global_step"] == 8
    # Listed first, it still runs after the EMA callback at each batch end (Lightning puts Checkpoints last), so
    # a periodic checkpoint holds that batch's EMA update.
    names = [type(cb).__name__ for cb in trainer.callbacks]
    assert names.index("AtomicCheckpoint") > names.index("EMA")
    assert not any(name == "ModelCheckpoint" for name in names), "Lightning added no default ModelCheckpoint"
    assert resume_path(ckpt_dir) == str(ckpt_dir / "last.ckpt")


def test_crash_during_a_real_save_keeps_the_previous_last(tmp_path, tiny_run):
    ckpt_dir = tmp_path / "ckpt"
    callback = AtomicCheckpoint(dirpath=str(ckpt_dir))
    module, trainer = tiny_run(2, callback)
    last = ckpt_dir / "last.ckpt"
    before = last.read_bytes()

    def dying_save(path, *args, **kwargs):
        Path(path).write_bytes(before[: len(before) // 2])  # half a checkpoint, then the process "dies"
        raise Crash("node lost")

    trainer.save_checkpoint = dying_save
    with pytest.raises(Crash):
        callback.save_last_now(trainer)
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
