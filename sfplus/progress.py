"""Training progress as plain lines (updates, rate, ETA, losses), for logs that are not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback

# The losses shown, when the module logs them (DiffusionModule / ODEInitModule, DistillModule).
SHOWN_METRICS = ("train/loss", "train/generator_loss", "train/critic_loss")


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"2 h 04 min"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLog(Callback):
    """Prints ``fit: update 1200/8000 (15%), 9.8 updates/s, ETA 11 min 33 s, loss 0.0421`` every ``every_s``
    seconds of training, and a last line when fit ends.

    Lightning's tqdm bar redraws one terminal line; written to a file or a pipe (a batch job's log, ``make demo |
    tee``) it shows nothing useful. So by default the lines are printed, and the bar turned off, only when stdout is
    not a terminal. Updates are optimizer updates (``trainer.global_step``, what ``trainer.max_steps`` counts); the
    rate and the ETA are measured from this run's first update (a resumed run counts from where it resumed).

    Args:
        every_s: seconds between lines.
        when: "not_tty" (lines instead of the bar when stdout is not a terminal), "always", or "never".
        stream: where to print (default: stdout).
    """

    def __init__(self, every_s: float = 10.0, when: str = "not_tty", stream: TextIO | None = None) -> None:
        if when not in ("not_tty", "always", "never"):
            raise ValueError(f"ProgressLog.when must be 'not_tty', 'always' or 'never', got {when!r}")
        self.every_s, self.when, self.stream = float(every_s), when, stream
        self._start: float | None = None
        self._start_step = 0
        self._last: float | None = None

    @property
    def active(self) -> bool:
        out = self.stream or sys.stdout
        return self.when == "always" or (self.when == "not_tty" and not (hasattr(out, "isatty") and out.isatty()))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        bar = trainer.progress_bar_callback
        if stage == "fit" and self.active and bar is not None and hasattr(bar, "disable"):
            bar.disable()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step, self._last = time.perf_counter(), trainer.global_step, time.perf_counter()

    def line(self, trainer: L.Trainer, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        step, total = trainer.global_step, trainer.max_steps
        took = now - (self._start if self._start is not None else now)
        done = step - self._start_step
        rate = done / took if took > 0 else 0.0
        parts = [f"update {step}/{total} ({100 * step / total:.0f}%)" if total and total > 0 else f"update {step}"]
        if rate > 0:
            parts.append(f"{rate:.1f} updates/s")
            if total and total > step:
                parts.append(f"ETA {format_duration((total - step) / rate)}")
        metrics = trainer.callback_metrics
        parts += [f"{name.split('/')[-1]} {float(metrics[name]):.4f}" for name in SHOWN_METRICS if name in metrics]
        return "fit: " + ", ".join(parts)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.active or trainer.global_rank != 0:
            return
        now = time.perf_counter()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        print(self.line(trainer, now), file=self.stream or sys.stdout, flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.global_rank != 0 or self._start is None:
            return
        took = time.perf_counter() - self._start
        print(f"fit: done, {trainer.global_step - self._start_step} updates in {format_duration(took)}",
              file=self.stream or sys.stdout, flush=True)


def default_callbacks(trainer: L.Trainer) -> list[Callback]:
    """The callbacks every sfplus module adds unless the config has its own: a :class:`ProgressLog`."""
    if any(isinstance(c, ProgressLog) for c in trainer.callbacks):
        return []
    return [ProgressLog()]
