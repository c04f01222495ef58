"""Preemption: a signal mid-run → checkpoint at the step boundary, requeue (fake command), stop; resume exactly."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from sfplus.callbacks import EMA
from sfplus.callbacks.checkpointing import AtomicCheckpoint, resume_path
from sfplus.callbacks.preemption import Preemption, agree_on_code, slurm_job_id
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import PromptDataModule
from sfplus.modules import DistillModule
from tests.helpers import TINY, write_tiny_teacher


@pytest.fixture()
def teacher_file(tmp_path: Path) -> str:
    return write_tiny_teacher(tmp_path / "teacher.safetensors")


@pytest.fixture()
def prompt_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    directions = ["left", "right", "up", "down"] * 3
    path.write_text("\n".join(f"a red square moving {d} {i}" for i, d in enumerate(directions)))
    return str(path)


def distill(teacher: str, cls: type = DistillModule) -> DistillModule:
    return cls(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                         teacher_checkpoint=teacher, video_shape=[3, 2, 4, 4], dfake_gen_update_ratio=2,
                         generator_optimizer={"lr": 1e-3}, critic_optimizer={"lr": 1e-3}, seed=3)


def data(prompt_file: str) -> PromptDataModule:
    return PromptDataModule(prompt_file, batch_size=2, batches_per_epoch=3)  # 3 batches/epoch: stops mid-epoch


def make_trainer(root: Path, max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(root),
        callbacks=[EMA(decay=0.5, start_iteration=1), *callbacks],
    )


class SignalAt(L.Callback):
    """Sends ``sig`` to this process at the end of batch ``at`` (a real signal, delivered to the handler)."""

    def __init__(self, at: int, sig: signal.Signals) -> None:
        self.at, self.sig, self.sent_at_step = at, sig, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at + 1 and self.sent_at_step is None:
            self.sent_at_step = trainer.global_step
            os.kill(os.getpid(), self.sig)


def fake_requeue(record: Path) -> list[str]:
    """A requeue command that writes the job id it was given to ``record``."""
    return [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(record), "{job_id}"]


def state(module: DistillModule, trainer: L.Trainer) -> dict:
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "opt": [o.state_dict() for o in trainer.optimizers],
        "counters": module.counters(),
        "global_step": trainer.global_step,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    assert a["global_step"] == b["global_step"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for oa, ob in zip(a["opt"], b["opt"]):
        for pid, st in oa["state"].items():
            for name, val in st.items():
                assert torch.equal(val, ob["state"][pid][name]), (pid, name)


def test_sigusr1_saves_at_step_boundary_requeues_and_resumes_exactly(tmp_path, teacher_file, prompt_file,
                                                                     monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGUSR1)

    straight = distill(teacher_file)
    t_straight = make_trainer(tmp_path / "a", 8, [])
    t_straight.fit(straight, datamodule=data(prompt_file))

    ckpt_dir, record = tmp_path / "ckpt", tmp_path / "requeued.txt"
    pre = Preemption(dirpath=str(ckpt_dir), requeue_command=fake_requeue(record))
    first = distill(teacher_file)
    t_first = make_trainer(tmp_path / "b", 8, [SignalAt(3, signal.SIGUSR1), pre])
    t_first.fit(first, datamodule=data(prompt_file))
    # Stopped at the boundary of the batch during which the signal arrived: 4 of 8 updates.
    assert t_first.global_step == 4
    assert t_first.should_stop
    assert pre.received == signal.SIGUSR1
    assert record.read_text() == "4242" and pre.requeued
    last = ckpt_dir / "last.ckpt"
    assert pre.saved_path == last and last.is_file()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"], "no temp names left behind"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    assert saved["sfplus"]["counters"]["iteration"] == first.iteration
    assert signal.getsignal(signal.SIGUSR1) == before, "handlers restored after fit"

    # The requeued job: same command, `--ckpt_path` from resume_path.
    assert resume_path(ckpt_dir) == str(last)
    resumed = distill(teacher_file)
    t_resumed = make_trainer(tmp_path / "c", 8, [])
    t_resumed.fit(resumed, datamodule=data(prompt_file), ckpt_path=resume_path(ckpt_dir))
    assert_same(state(straight, t_straight), state(resumed, t_resumed))


def test_plain_module_resumes_exactly_from_batch_end_checkpoint(tmp_path, teacher_file, prompt_file):
    straight = distill(teacher_file, DistillModule)
    t_straight = make_trainer(tmp_path / "a", 6, [])
    t_straight.fit(straight, datamodule=data(prompt_file))
    first = distill(teacher_file, DistillModule)
    make_trainer(tmp_path / "b", 6, [SignalAt(3, signal.SIGUSR1), Preemption(dirpath=str(tmp_path / "ckpt"))]).fit(
        first, datamodule=data(prompt_file))
    resumed = distill(teacher_file, DistillModule)
    t_resumed = make_trainer(tmp_path / "c", 6, [])
    t_resumed.fit(resumed, datamodule=data(prompt_file), ckpt_path=resume_path(tmp_path / "ckpt"))
    assert_same(state(straight, t_straight), state(resumed, t_resumed))


def test_sigterm_saves_and_stops_without_requeue_through_atomic_checkpoint(tmp_path, teacher_file, prompt_file,
                                                                           monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    before = signal.getsignal(signal.SIGTERM)
    record = tmp_path / "requeued.txt"
    ckpt = AtomicCheckpoint(dirpath=str(tmp_path / "ckpt"))  # no periodic saves; last.ckpt only
    pre = Preemption(requeue_command=fake_requeue(record))  # no dirpath: uses the AtomicCheckpoint's
    module = distill(teacher_file)
    tr = make_trainer(tmp_path / "r", 6, [SignalAt(1, signal.SIGTERM), pre, ckpt])
    tr.fit(module, datamodule=data(prompt_file))
    assert tr.global_step == 2 and pre.received == signal.SIGTERM
    assert not record.exists() and not pre.requeued, "SIGTERM (e.g. scancel) must not requeue"
    assert pre.saved_path == tmp_path / "ckpt" / "last.ckpt"
    # The AtomicCheckpoint knows the state is saved: no second save at train end (same file, same step).
    assert torch.load(pre.saved_path, weights_only=True)["global_step"] == 2
    assert ckpt._last_global_step == 2
    # Lightning's own SIGTERM handler (which would raise SIGTERMException) was replaced during fit, then restored.
    assert signal.getsignal(signal.SIGTERM) == before


def test_no_signal_no_save(tmp_path, teacher_file, prompt_file):
    pre = Preemption(dirpath=str(tmp_path / "ckpt"))
    tr = make_trainer(tmp_path / "r", 2, [pre])
    tr.fit(distill(teacher_file), datamodule=data(prompt_file))
    assert pre.saved_path is None and not (tmp_path / "ckpt" / "last.ckpt").exists()
    assert tr.global_step == 2


def test_signal_names_are_validated():
    with pytest.raises(ValueError, match="Preemption.signals: unknown signal 'SIGNOPE'"):
        Preemption(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="requeue_signals"):
        Preemption(signals=["SIGTERM"], requeue_signals=["SIGUSR1"])
    with pytest.raises(ValueError, match="requeue_command must not be empty"):
        Preemption(requeue_command=[])
    assert Preemption(signals=["usr2", "TERM"], requeue_signals=["USR2"]).signals == [signal.SIGUSR2, signal.SIGTERM]


def test_slurm_job_id_forms():
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "123"}) == "123"
    assert slurm_job_id({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "7"}) == "123_7"
    with pytest.raises(ValueError, match="not a job id"):
        slurm_job_id({"SLURM_JOB_ID": "1; rm -rf /"})


def _agree_worker(rank: int, port: int, codes: list[int], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(codes))
    try:
        Path(out, f"{rank}.txt").write_text(str(agree_on_code(codes[rank])))
    finally:
        dist.destroy_process_group()


def test_flag_is_agreed_across_ranks(tmp_path):
    """A signal seen by one rank only (here rank 1, a requeue request) reaches every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported modules (spawn would re-import lightning and sfplus: ~15 s)
    mp.start_processes(_agree_worker, args=(port, [0, 2], str(tmp_path)), nprocs=2, join=True, start_method="fork")
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == ["2", "2"]
    assert agree_on_code(1) == 1  # not distributed: identity
