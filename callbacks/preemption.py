"""Preemption: checkpoint at the next step boundary after SIGUSR1/SIGTERM, requeue the SLURM job, stop.

Why not Lightning's own SLURM auto-requeue: its SIGUSR1 handler saves the checkpoint *inside the signal handler*, at
whatever bytecode the main thread was running (mid-forward, mid-optimizer-step, inside a collective), which with
sharded saves can deadlock or save a half-updated state (Lightning-AI/pytorch-lightning#21406);
its SIGTERM handler also runs a ``dist.broadcast`` from inside the handler. Here the handler only records the signal.
At the end of the current batch (``on_train_batch_end``) every rank agrees on it (all-reduce max, so one rank's
signal stops all of them at the same step), all ranks save ``<dirpath>/last.ckpt`` together through the atomic
temp-name + rename of :mod:`sfplus.callbacks.checkpointing`, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``, and
training stops (``trainer.should_stop``).

Configure Lightning's SLURM environment with ``auto_requeue=False`` (``trainer.plugins:
[{class_path: lightning.pytorch.plugins.environments.SLURMEnvironment, init_args: {auto_requeue: false}}]``): with it
on, Lightning also installs a SIGTERM "bypass" handler and resumes any stage (even ``predict``) from
``hpc_ckpt_*.ckpt`` files on its own. The sbatch template in ``tools/slurm/`` does this.

Signals, by default: ``SIGUSR1`` (sent by ``#SBATCH --signal=USR1@300``, 300 s before the time limit) saves and
requeues; ``SIGTERM`` (preemption by a higher-priority job, ``scancel``, node shutdown) saves and stops *without*
requeueing, so ``scancel`` still ends the job (SLURM requeues preempted jobs itself when the partition's
``PreemptMode=REQUEUE``). DataLoader worker processes inherit the handler; in them it only sets a flag nobody reads.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from sfplus.callbacks.checkpointing import LAST, AtomicCheckpoint, save_trainer_checkpoint

__all__ = ["Preemption", "agree_on_code", "slurm_job_id"]

DEFAULT_REQUEUE_COMMAND = ("scontrol", "requeue", "{job_id}")

# What a rank has seen, agreed across ranks with a max: the strongest request wins.
NONE, STOP, REQUEUE = 0, 1, 2


def _parse_signal(value: str | int, field: str) -> signal.Signals:
    try:
        if isinstance(value, int) or (isinstance(value, str) and value.isdecimal()):
            return signal.Signals(int(value))
        name = value.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise ValueError(f"Preemption.{field}: unknown signal {value!r} (use a name like SIGUSR1 or SIGTERM)") from None


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` expects: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None
    outside SLURM."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else env.get("SLURM_JOB_ID")
    if job is not None and not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"SLURM job id {job!r} is not a job id (digits and '_')")
    return job


def agree_on_code(code: int, device: torch.device | str = "cpu") -> int:
    """The maximum of ``code`` over all ranks (identity when not distributed). One 1-element all-reduce."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code
    if torch.distributed.get_world_size() == 1:
        return code
    t = torch.tensor([code], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


class Preemption(Checkpoint):
    """Save ``last.ckpt`` and stop (and requeue under SLURM) when the job is told to end.

    Being a Lightning ``Checkpoint`` it runs after the other callbacks at each batch end (the batch's EMA update is
    in the saved state). When an :class:`~sfplus.callbacks.checkpointing.AtomicCheckpoint` is configured and no
    ``dirpath`` is given here, its folder and its ``last.ckpt`` are used (so it does not save the same state again
    at the end of training). As a checkpoint callback it cannot be combined with ``enable_checkpointing=False``.

    Args:
        dirpath: folder of ``last.ckpt`` (default: the AtomicCheckpoint's, else ``<default_root_dir>/checkpoints``).
        signals: signals that request a checkpoint and a stop.
        requeue_signals: those of ``signals`` that also requeue the SLURM job.
        requeue_command: command run by rank 0 to requeue; ``{job_id}`` is replaced by the SLURM job id. Only run
            when ``SLURM_JOB_ID`` is set. A failure is reported, not raised (the checkpoint is already safe).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        signals: list[str] | None = None,
        requeue_signals: list[str] | None = None,
        requeue_command: list[str] | None = None,
    ) -> None:
        names = ["SIGUSR1", "SIGTERM"] if signals is None else signals
        self.signals = [_parse_signal(s, "signals") for s in names]
        requeue = ["SIGUSR1"] if requeue_signals is None else requeue_signals
        self.requeue_signals = {_parse_signal(s, "requeue_signals") for s in requeue}
        stray = self.requeue_signals - set(self.signals)
        if stray:
            raise ValueError(
                f"Preemption.requeue_signals {sorted(s.name for s in stray)} are not among signals "
                f"{[s.name for s in self.signals]}"
            )
        self.requeue_command = list(DEFAULT_REQUEUE_COMMAND if requeue_command is None else requeue_command)
        if not self.requeue_command:
            raise ValueError("Preemption.requeue_command must not be empty")
        self._dirpath_arg = dirpath
        self.dirpath: Path | None = None
        self._delegate: AtomicCheckpoint | None = None
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self.saved_path: Path | None = None
        self.requeued = False

    # -- signal handling: only record (a handler that saves would run in the middle of a step) --
    def _handler(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        # A requeue request is not downgraded by a later SIGTERM (scontrol requeue itself sends one).
        if self._received is None or sig in self.requeue_signals:
            self._received = sig

    def _install(self, remember: bool) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: not in the main thread, signal handlers not installed")
            return
        for sig in self.signals:
            previous = signal.signal(sig, self._handler)
            if remember:
                self._previous.setdefault(sig, previous)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def received(self) -> signal.Signals | None:
        """The signal recorded on this rank (None if none)."""
        return self._received

    # -- lifecycle --
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._delegate = None
        if self._dirpath_arg is None:
            self._delegate = next((cb for cb in trainer.callbacks if isinstance(cb, AtomicCheckpoint)), None)
        if self._delegate is None:
            dirpath = self._dirpath_arg or os.path.join(trainer.default_root_dir, "checkpoints")
            self.dirpath = Path(trainer.strategy.broadcast(str(dirpath)))
        self._received, self.saved_path, self.requeued = None, None, False
        self._install(remember=True)  # signals during model setup and checkpoint loading are kept too

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its own SIGTERM handler after `setup` (one that broadcasts inside the handler);
        # take the signals back. Lightning restores its originals (ours) at teardown, then `teardown` restores ours'.
        self._install(remember=False)
        if self._delegate is not None:
            self.dirpath = self._delegate.dirpath

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # Lightning skips callback teardown when training fails

    # -- the step boundary --
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        local = NONE if self._received is None else (REQUEUE if self._received in self.requeue_signals else STOP)
        code = agree_on_code(local, trainer.strategy.root_device) if trainer.world_size > 1 else local
        if code == NONE or self.saved_path is not None:  # nothing asked, or already saved for this request
            return
        what = f"signal {self._received.name}" if self._received is not None else "a signal on another rank"
        rank_zero_info(f"sfplus: {what}: saving at global step {trainer.global_step}, then stopping")
        for logger in trainer.loggers:  # the job may be killed soon after the requeue: flush the logs first
            try:
                logger.save()
            except Exception as err:  # noqa: BLE001 - logs are a convenience, the checkpoint is what matters
                rank_zero_warn(f"Preemption: flushing logger {type(logger).__name__} failed: {err}")
        if self._delegate is not None:
            self.saved_path = self._delegate.save_last_now(trainer)
        else:
            self.saved_path = save_trainer_checkpoint(trainer, self.dirpath / LAST)
        if code == REQUEUE and trainer.is_global_zero:
            self.requeued = self._requeue()
        trainer.should_stop = True

    def _requeue(self) -> bool:
        job = slurm_job_id()
        if job is None:
            rank_zero_info("sfplus: not running under SLURM (no SLURM_JOB_ID): not requeueing")
            return False
        cmd = [part.replace("{job_id}", job) for part in self.requeue_command]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            # e.g. scontrol missing inside a container (NVIDIA/pyxis#129): resubmit by hand, resume is automatic.
            rank_zero_warn(f"Preemption: requeue command {cmd} failed: {err}")
            return False
        if result.returncode != 0:
            rank_zero_warn(
                f"Preemption: requeue command {cmd} exited with {result.returncode}: {result.stderr.strip()}"
            )
            return False
        rank_zero_info(f"sfplus: requeued SLURM job {job}")
        return True
