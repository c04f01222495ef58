"""Fixtures shared across the CPU suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tests of many tiny ops: one thread avoids oversubscribing the shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dit():
    """The tiny WanDiT preset with a non-zero head (a zero-initialised head would make every output 0)."""
    from sfplus.nets.presets import build_dit

    torch.manual_seed(0)
    model = build_dit("tiny").eval()
    model.init_weights()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.2)
    return model
