"""One generation at a time, the others waiting in line: the queue behind ``sfplus serve``.

A :class:`Job` is one request (prompt, seed, optional first frame) and the client it streams to. The
:class:`GenerationQueue` runs jobs one by one on a single worker task: each step of the module's streaming generator
(:meth:`sfplus.modules.base.RecipeModule.stream`, one decoded block) runs in a thread, so the event loop keeps serving
pages, queue positions and cancellations while the net works. Between blocks the worker checks whether the job was
cancelled (its client left or pressed Stop) and then closes the generator, which stops generation there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

log = logging.getLogger("sfplus.serve")

__all__ = ["GenerationQueue", "Job", "JobClient", "QueueFull"]


class QueueFull(RuntimeError):
    """More jobs wait than the queue holds."""


class JobClient(Protocol):
    """Where a job's progress goes (the WebSocket session in :mod:`sfplus.serve.app`)."""

    async def queued(self, position: int) -> None: ...
    async def started(self) -> None: ...
    async def block(self, index: int, frames: torch.Tensor, elapsed: float) -> None: ...
    async def finished(self, frames: list[torch.Tensor], stats: dict[str, float]) -> None: ...
    async def failed(self, message: str) -> None: ...
    async def cancelled(self) -> None: ...


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """A request: ``prompt``, ``seed``, ``image`` (I2V first frame [1, 3, H, W] in [-1, 1] at the generation size,
    or None), and the ``client`` it reports to."""

    prompt: str
    seed: int
    client: JobClient
    image: torch.Tensor | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cancel_requested: bool = False

    def cancel(self) -> None:
        self.cancel_requested = True


# How one job turns into frame blocks: (job) -> iterator of uint8 [T_n, H, W, 3]. The app binds it to the module.
StreamFn = Callable[[Job], Iterator[torch.Tensor]]


class GenerationQueue:
    """Jobs run one at a time in arrival order; at most ``max_waiting`` wait (more: :class:`QueueFull`).

    ``stream`` makes a job's frame blocks; ``after_job`` runs in the worker thread after every job (e.g. releasing
    cached GPU memory), whatever the job's outcome.
    """

    def __init__(self, stream: StreamFn, max_waiting: int = 8,
                 after_job: Callable[[], None] | None = None) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.stream, self.max_waiting, self.after_job = stream, max_waiting, after_job
        self.waiting: list[Job] = []
        self.running: Job | None = None
        self.completed = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="sfplus-generation")

    async def stop(self) -> None:
        if self.running is not None:
            self.running.cancel()
        for job in self.waiting:
            job.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ---- clients --------------------------------------------------------------------------------------------------
    async def submit(self, job: Job) -> int:
        """Put ``job`` in line; returns its position (1 = next). Raises :class:`QueueFull`."""
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the server is busy: {len(self.waiting)} generations are already waiting; "
                            "try again in a minute")
        self.waiting.append(job)
        position = len(self.waiting)
        await _quietly(job.client.queued(position), job)
        self._wake.set()
        return position

    async def withdraw(self, job: Job) -> bool:
        """Cancel ``job``: a waiting job leaves the line (returns True; it is never started), a running one stops
        after its current block (returns False; its client is told ``cancelled`` then)."""
        job.cancel()
        if job in self.waiting:
            self.waiting.remove(job)
            await self._tell_positions()
            return True
        return False

    # ---- the worker -----------------------------------------------------------------------------------------------
    async def _tell_positions(self) -> None:
        for i, job in enumerate(list(self.waiting)):
            await _quietly(job.client.queued(i + 1), job)

    async def _work(self) -> None:
        while True:
            while not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            job = self.waiting.pop(0)
            await self._tell_positions()
            if job.cancel_requested:
                continue
            self.running = job
            try:
                await self._run(job)
            finally:
                self.running = None
                self.completed += 1
                if self.after_job is not None:
                    await asyncio.to_thread(self.after_job)

    async def _run(self, job: Job) -> None:
        await _quietly(job.client.started(), job)
        start = time.perf_counter()
        frames: list[torch.Tensor] = []
        first_frame_s: float | None = None
        blocks = None
        try:
            blocks = await asyncio.to_thread(job_stream, self.stream, job)
            index = 0
            while not job.cancel_requested:
                block = await asyncio.to_thread(next, blocks, None)  # one block generated and decoded
                if block is None:
                    break
                elapsed = time.perf_counter() - start
                first_frame_s = elapsed if first_frame_s is None else first_frame_s
                frames.append(block)
                await _quietly(job.client.block(index, block, elapsed), job)
                index += 1
        except Exception as err:  # the server outlives any one generation: the client is told, the log keeps it
            log.exception("generation %d failed", job.id)
            await _quietly(job.client.failed(f"generation failed: {type(err).__name__}: {err}".splitlines()[0]), job)
            return
        finally:
            if blocks is not None:
                await asyncio.to_thread(blocks.close)  # stops a cancelled generation, frees its KV cache
        if job.cancel_requested:
            log.info("generation %d cancelled after %d blocks", job.id, len(frames))
            await _quietly(job.client.cancelled(), job)
            return
        seconds = time.perf_counter() - start
        count = sum(len(b) for b in frames)
        stats = {"seconds": seconds, "time_to_first_frame": first_frame_s or seconds, "frames": float(count),
                 "fps": count / seconds if seconds > 0 else 0.0}
        log.info("generation %d: %d frames in %.2f s (first frame after %.2f s, %.1f frames/s)", job.id, count,
                 seconds, stats["time_to_first_frame"], stats["fps"])
        await _quietly(job.client.finished(frames, stats), job)


def job_stream(stream: StreamFn, job: Job) -> Iterator[torch.Tensor]:
    """``stream(job)`` (made in the worker thread: building a generator runs nothing, but a module may check
    inputs eagerly)."""
    return iter(stream(job))


async def _quietly(call: Awaitable[Any], job: Job) -> None:
    """Send to a client that may have gone: a failed send cancels its job instead of stopping the worker."""
    try:
        await call
    except Exception as err:  # a closed WebSocket raises one of several types, by server library and timing
        log.info("client of generation %d is gone (%s): cancelling it", job.id, type(err).__name__)
        job.cancel()
