"""Callbacks of sfplus (installed as ``sfplus.callbacks``)."""

from sfplus.callbacks.ema import EMA
from sfplus.callbacks.sample_logger import SampleLogger
from sfplus.callbacks.video_writer import VideoWriter

__all__ = ["EMA", "SampleLogger", "VideoWriter"]
