"""Peak bytes of tensors a function allocates: the allocator's view of a step.

Resident memory (RSS) counts what the C allocator keeps after tensors are freed
(fragmentation, per-thread arenas, gloo's and Python's own buffers), which dwarfs small
micro-batches. What the memory replay (`passes/memory.py`) predicts is the tensors
alive, so that is what this measures: on CUDA the caching allocator's own
``max_memory_allocated``; on CPU, where torch keeps no such counter, every allocation
and free the profiler records on the calling thread (``profile_memory=True``), summed in
time order. Allocations made on other threads (none of the executor's) are not seen,
and frees of blocks allocated before the recording starts are not reported on CPU (torch
warns about them): a step that frees older tensors reads higher than it is, never
lower.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import torch


def allocation_peak(fn: Callable[[], Any], device: Optional[torch.device] = None) -> Tuple[Any, int]:
    """``(fn(), peak bytes)``: the most bytes of tensors alive at once while ``fn`` ran
    on ``device``, above what was alive when it started (on CUDA frees of older tensors
    lower it; on CPU they are not seen, see the module docstring)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    # Kineto logs "USDT: profiler_start/stop" on every profile, read when the profiler first
    # starts; a level above its USDT (5) keeps the bench's progress lines clean (a user's own
    # setting wins)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, _peak_of_events(prof)


def _peak_of_events(prof: Any) -> int:
    """Running sum of the profiler's CPU allocator events in time order; its maximum."""
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak
