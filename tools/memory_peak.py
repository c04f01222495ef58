"""What is alive at the peak: replay a CUDA allocator trace and group the live blocks by the code that made them.

    from tools.memory_peak import trace_peak
    report = trace_peak(step, device, top=25)   # runs step() once under torch's allocator history

`max_memory_allocated` says how high memory went; this says what made it go there. The allocator history
(`torch.cuda.memory._record_memory_history`) logs every allocation and free with its Python stack; replaying the
log finds the moment of the peak and the blocks alive at it, and each block is charged to the innermost stack
frame in project code (sfplus, tools, or whatever `sites` names), e.g. ``sfplus/nets/wan.py:301 forward``.
Memory allocated before the trace started is one row ("allocated before the trace").

On the CPU the same replay runs on the profiler's allocation events (`torch.profiler` with ``profile_memory``):
each allocation is charged to the innermost project function around it (the line is the function's ``def``), and
the peak counts only memory allocated while tracing (the CPU allocator keeps no running total), so weights and
optimizer states made before the call are not in it. That is what a CPU comparison of two training steps needs:
scaled-down nets, the same step on both sides, and the activations each side keeps.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

GIB = 2**30
DEFAULT_SITES = ("sfplus/", "tools/", "/sfp/")


def _site(frames: list[dict], sites: Iterable[str]) -> str:
    """The innermost frame whose file path contains one of `sites` (else the innermost frame)."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(s in name for s in sites):
            # sfplus/... from the package root; elsewhere the folder and file (tools/bench.py, model/dmd.py)
            rooted = "/" + name  # the profiler's paths can be relative (sfplus/nets/wan.py)
            if "/sfplus/" in rooted:
                short = "sfplus/" + rooted.split("/sfplus/", 1)[1]
            else:
                short = "/".join(name.split("/")[-2:])
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?')}:{f.get('line')} {f.get('name')}"
    return "(no stack)"


def live_at_peak(events: list[dict], before: int = 0) -> tuple[int, list[dict], int]:
    """Replay allocator events; return (peak bytes, blocks alive at the peak, bytes allocated before the trace
    that were still alive then). `before` is memory_allocated when the trace started."""
    current = peak = before
    peak_index = -1
    for i, ev in enumerate(events):
        action = ev.get("action")
        if action == "alloc":
            current += ev["size"]
            if current > peak:
                peak, peak_index = current, i
        elif action == "free_requested":
            current -= ev["size"]
    live: dict[int, dict] = {}
    freed_before = 0
    for ev in events[: peak_index + 1]:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = ev
        elif action == "free_requested":
            if live.pop(ev["addr"], None) is None:
                freed_before += ev["size"]  # a block from before the trace
    return peak, list(live.values()), before - freed_before


def group_blocks(blocks: list[dict], sites: Iterable[str] = DEFAULT_SITES) -> list[tuple[str, int, int]]:
    """[(site, bytes, count)] sorted by bytes, largest first."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in blocks:
        entry = sums[_site(b.get("frames") or [], sites)]
        entry[0] += b["size"]
        entry[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in sums.items()), key=lambda r: -r[1])


_PY_FRAME = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<name>.*)$")


def _profiler_frames(event) -> list[dict]:
    """The Python functions around a profiler event, innermost first, as allocator-history frames; an operator
    (``aten::mm``) becomes a frame of its own so that allocations outside project code still say what made them."""
    from torch._C._profiler import _EventType

    frames, parent = [], event.parent
    while parent is not None:
        if parent.tag == _EventType.PyCall:
            m = _PY_FRAME.match(parent.name)
            if m:
                frames.append(dict(filename=m["file"], line=int(m["line"]), name=m["name"]))
        elif parent.tag == _EventType.TorchOp and not frames:
            frames.append(dict(filename=parent.name, line=0, name="op"))
        parent = parent.parent
    return frames


def cpu_events(fn: Callable[[], object]) -> list[dict]:
    """Run fn() under the profiler; its CPU allocations and frees as allocator-history events, in time order."""
    from torch._C._profiler import _EventType
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        fn()
    stack, allocations = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append(event)
    allocations.sort(key=lambda e: (e.start_time_ns, e.extra_fields.total_allocated))
    events = []
    for e in allocations:
        size = e.extra_fields.alloc_size
        if size > 0:
            events.append(dict(action="alloc", addr=e.extra_fields.ptr, size=size, frames=_profiler_frames(e)))
        elif size < 0:
            events.append(dict(action="free_requested", addr=e.extra_fields.ptr, size=-size))
    return events


def trace_peak(fn: Callable[[], object], device: torch.device, top: int = 25,
               sites: Iterable[str] = DEFAULT_SITES) -> dict:
    """Run fn() once with the allocator history on; return the peak and its largest live sites (GiB).

    On the CPU the peak is of the memory allocated during fn() (see the module docstring)."""
    if device.type == "cpu":
        events = cpu_events(fn)
        peak, blocks, old = live_at_peak(events, 0)
        return _report(peak, blocks, old, len(events), top, sites)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=5_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][device.index or 0]
    peak, blocks, old = live_at_peak(events, before)
    return _report(peak, blocks, old, len(events), top, sites)


def _report(peak: int, blocks: list[dict], old: int, n_events: int, top: int, sites: Iterable[str]) -> dict:
    rows = group_blocks(blocks, sites)
    return dict(peak_gib=round(peak / GIB, 4), before_trace_gib=round(old / GIB, 4), events=n_events,
                sites=[dict(site=s, gib=round(b / GIB, 4), blocks=n) for s, b, n in rows[:top]])
