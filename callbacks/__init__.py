"""Callbacks of sfplus (installed as ``sfplus.callbacks``)."""

from sfplus.callbacks.checkpointing import AtomicCheckpoint, resume_path
from sfplus.callbacks.ema import EMA
from sfplus.callbacks.preemption import Preemption
from sfplus.callbacks.sample_logger import SampleLogger
from sfplus.callbacks.video_writer import VideoWriter
from sfplus.progress import ProgressLog

__all__ = ["AtomicCheckpoint", "EMA", "Preemption", "ProgressLog", "SampleLogger", "VideoWriter", "resume_path"]
