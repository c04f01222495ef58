"""tools/memory_peak.py: replaying an allocator trace finds the peak and charges live blocks to code sites."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sfplus_tools_memory_peak", ROOT / "tools" / "memory_peak.py")
memory_peak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_peak)


def _frames(*sites):
    return [{"filename": f, "line": line, "name": name} for f, line, name in sites]


TORCH = ("/venv/lib/python3.11/site-packages/torch/nn/functional.py", 10, "linear")
WAN = ("/repo/sfplus/nets/wan.py", 301, "forward")
ROLL = ("/repo/sfplus/rollout/bidirectional.py", 40, "bidirectional_rollout")


def test_peak_and_live_blocks():
    events = [
        dict(action="alloc", addr=1, size=100, frames=_frames(TORCH, WAN)),
        dict(action="alloc", addr=2, size=50, frames=_frames(ROLL)),
        dict(action="free_requested", addr=1, size=100),
        dict(action="free_completed", addr=1, size=100),
        dict(action="alloc", addr=3, size=30, frames=_frames(TORCH, WAN)),
        dict(action="free_requested", addr=99, size=20),  # a block from before the trace
        dict(action="alloc", addr=4, size=200, frames=_frames(TORCH, ROLL)),  # peak: 1000 + 50 + 30 - 20 + 200
        dict(action="free_requested", addr=4, size=200),
    ]
    peak, live, old = memory_peak.live_at_peak(events, before=1000)
    assert peak == 1260
    assert sorted(b["addr"] for b in live) == [2, 3, 4]
    assert old == 980
    rows = memory_peak.group_blocks(live)
    assert rows == [("sfplus/rollout/bidirectional.py:40 bidirectional_rollout", 250, 2),
                    ("sfplus/nets/wan.py:301 forward", 30, 1)]


def test_peak_before_any_allocation_is_the_starting_memory():
    peak, live, old = memory_peak.live_at_peak([dict(action="free_requested", addr=5, size=10)], before=40)
    assert (peak, live, old) == (40, [], 40)


def test_cpu_trace_finds_the_peak_and_the_function_that_holds_it():
    import torch

    kept = []

    def hold_then_spike():
        kept.append(torch.ones(1 << 20))  # 4 MiB, alive after the call
        spike = torch.ones(1 << 21)  # 8 MiB, freed on return: the peak is 12 MiB
        return float(spike[0])

    report = memory_peak.trace_peak(hold_then_spike, torch.device("cpu"), top=5, sites=("test_memory_peak",))
    assert abs(report["peak_gib"] * 1024 - 12) < 0.05
    top = report["sites"][0]
    assert top["site"].endswith("hold_then_spike") and abs(top["gib"] * 1024 - 12) < 0.05
    # one site for both tensors (the CPU trace names functions); nothing allocated before it is counted
    assert report["before_trace_gib"] == 0
