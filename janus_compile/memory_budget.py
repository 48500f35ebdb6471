"""The per-rank memory WaveK may fill when the user sets no cap (``memory_cap_gb='auto'``).

A count of P micro-batches in flight per rank is only a stand-in for memory, and a poor
one: it leaves a large GPU mostly empty, while the folded schedule needs 1.5-3 P in
flight to keep its four phases from colliding (docs/runtime.md), and it does not stop a
model whose P micro-batches do not fit. So by default WaveK searches in-flight caps up to
min(M, 3P) against a share of the memory each rank really has: its own GPU, or on CPU the
host's memory split between the processes the host runs.

Every budget, this one or a cap the user sets, is for the replayed peak of a rank's
program plus the optimizer state every rank holds (`optimizer_state_bytes`).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

log = logging.getLogger(__name__)

AUTO_MEMORY = "auto"
# Share of a device's memory the replayed peak may reach: the rest is the caching
# allocator's slack and fragmentation, the CUDA context, and what the replay does not
# count (communication buffers, the interpreter).
AUTO_MEMORY_FRACTION = 0.75


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of one copy of the model's parameters (a gradient, an Adam moment)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """What every rank holds besides its program's values: the parameters, their
    gradients and the two Adam moments (parameters are replicated on every rank)."""
    from .passes.symfold_ilp import OPTIMIZER_COPIES

    return OPTIMIZER_COPIES * param_bytes(model)


def host_memory_bytes() -> Optional[int]:
    """Physical memory of this host, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def device_memory_bytes(device: str, processes_per_host: int) -> Optional[int]:
    """Memory one pipeline process has: its GPU's on ``cuda`` (every process has its own),
    else the host's memory divided between the ``processes_per_host`` processes on it."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    host = host_memory_bytes()
    return None if host is None else host // max(1, processes_per_host)


def auto_memory_budget_bytes(device: str, processes_per_host: int, fraction: float = AUTO_MEMORY_FRACTION) -> Optional[int]:
    """What ``memory_cap_gb='auto'`` stands for, in bytes per rank (None: unknown, and
    WaveK keeps the count cap of P)."""
    total = device_memory_bytes(device, processes_per_host)
    if total is None:
        log.warning("memory_cap_gb='auto': cannot tell the memory of a %s rank; WaveK keeps P micro-batches in flight", device)
        return None
    return int(fraction * total)
