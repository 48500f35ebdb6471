"""What a message costs the CPU of the ranks that send and receive it.

On CPU ranks gloo moves every tensor through loopback TCP: the kernel copies it out of
the sender and into the receiver, and gloo's threads wake up to do it. On a machine
whose cores are all busy computing, that work is taken from the ranks' compute, which
no link bandwidth models (a slower simulated link delays arrivals instead, and list
schedules then reorder around transfers that in truth overlap fine).

So we measure it as the workers meet it: two gloo processes (one thread each, as the
pipeline workers) run a fixed compute loop, first alone, then exchanging one message per
compute unit in both directions, received one unit later as the executor does (receives
posted ahead into freshly allocated buffers, sends waited for after the answer). A
message is what one Send / Recv action moves: one or more tensors posted together. The
extra time per unit is one sent and one received message on each rank; a least-squares
fit over message shapes (1 tensor of 64 KiB, 1 MiB, 8 MiB; 16 tensors of 64 KiB) gives
seconds per message, per tensor and per byte. The result is cached per process and, for
a day, on disk (`copy_cost_cache_path`), so that the CLI, torchrun and repeated runs on
one machine do not each spend the probe's ~7 s; delete the file to measure again.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .malloc_tuning import USER_VARIABLES

log = logging.getLogger(__name__)

Shape = Tuple[int, int]  # (tensors per message, bytes per tensor)
PROBE_SHAPES: Tuple[Shape, ...] = ((1, 1 << 16), (1, 1 << 20), (1, 1 << 23), (16, 1 << 16))
PROBE_UNITS = 16  # compute units (and messages each way) per timed run
PROBE_REPEATS = 3  # runs of each shape, interleaved; the median is kept
UNIT_MATRIX = 700  # float64 matmul side of one compute unit: ~10 ms on one core, so that a
# message has time to arrive and what is left is the CPU it takes
PROBE_VERSION = 2  # part of the disk cache's key: a changed probe measures again
DISK_CACHE_TTL_S = 24 * 3600.0  # how long a measurement on disk is reused


@dataclass(frozen=True)
class CopyCost:
    """CPU seconds a rank spends on one message it sends or receives: ``per_message_s``
    (waking gloo's threads), plus ``per_tensor_s`` for each tensor in it, plus
    ``per_byte_s`` × its bytes (the kernel's copies)."""

    per_message_s: float = 0.0
    per_tensor_s: float = 0.0
    per_byte_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.per_message_s >= 0 and self.per_tensor_s >= 0 and self.per_byte_s >= 0):
            raise ValueError(f"copy costs must be >= 0, got {self}")

    def of(self, tensors: int, nbytes: float) -> float:
        """One message of ``tensors`` tensors and ``nbytes`` bytes in all."""
        return self.per_message_s + tensors * self.per_tensor_s + nbytes * self.per_byte_s

    @property
    def free(self) -> bool:
        return self.per_message_s == 0 and self.per_tensor_s == 0 and self.per_byte_s == 0

    def describe(self) -> str:
        if self.free:
            return "not charged"
        gbs = f"{1e-9 / self.per_byte_s:.3g} GB/s" if self.per_byte_s > 0 else "no per-byte cost"
        return f"{1e6 * self.per_message_s:.3g} µs per message + {1e6 * self.per_tensor_s:.3g} µs per tensor + {gbs}"


def fit_copy_cost(extra_per_unit: Dict[Shape, float]) -> CopyCost:
    """Least-squares fit of extra seconds per unit = 2 × (message + n × tensor + n × size ×
    byte) over message shapes (n tensors of ``size`` bytes): a unit carries one sent and one
    received message per rank. Terms the noise drives negative are refitted as 0."""
    pts = sorted(extra_per_unit.items())
    if len({s for (_, s), _ in pts}) < 2 or len({n for (n, _), _ in pts}) < 2:
        raise ValueError(f"need two tensor sizes and two tensor counts to fit a copy cost, got shapes {[k for k, _ in pts]}")
    a = np.array([[2.0, 2.0 * n, 2.0 * n * s] for (n, s), _ in pts])
    y = np.array([t for _, t in pts])
    keep = [0, 1, 2]
    while True:
        coef = np.zeros(3)
        if keep:
            coef[keep] = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
        negative = [k for k in keep if coef[k] < 0]
        if not negative:
            break
        keep.remove(min(negative, key=lambda k: coef[k] * a[:, k].mean()))
    return CopyCost(per_message_s=float(coef[0]), per_tensor_s=float(coef[1]), per_byte_s=float(coef[2]))


def _probe_worker(rank: int, world: int, shapes: Sequence[Shape], units: int, repeats: int) -> Dict[Shape, List[float]]:
    """Seconds per run of ``units`` compute units, per message shape ((0, 0): no messages)."""
    peer = 1 - rank
    a = torch.rand(UNIT_MATRIX, UNIT_MATRIX, dtype=torch.float64)
    out = torch.empty_like(a)

    def tensors(shape: Shape, fill: float) -> List[torch.Tensor]:
        n, size = shape
        return [torch.full((size // 8,), fill, dtype=torch.float64) for _ in range(n)]

    send_bufs_of = {shape: tensors(shape, 1.0) for shape in shapes}

    def posted_receives(shape: Shape) -> List:
        # a fresh buffer per message, as the executor allocates one per received tensor:
        # whatever the allocator costs for that (page faults) is part of a message's cost
        n, size = shape
        return [dist.irecv(torch.empty(size // 8, dtype=torch.float64), src=peer) for _ in range(n)]

    def run(shape: Shape) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if shape == (0, 0):
            for _ in range(units):
                torch.mm(a, a, out=out)
        else:
            send_bufs = send_bufs_of[shape]
            recvs = posted_receives(shape)
            sent: List = []
            for i in range(units):
                torch.mm(a, a, out=out)
                if i > 0:  # message i-1 had a whole unit to arrive
                    for w in recvs:
                        w.wait()
                    for w in sent:
                        w.wait()  # the peer's answer proves it arrived: returns at once
                    recvs = posted_receives(shape)
                sent = [dist.isend(b, dst=peer) for b in send_bufs]
            for w in recvs + sent:
                w.wait()
        return time.perf_counter() - t0

    every = ((0, 0), *shapes)
    for shape in every:  # warm-up: allocations, connections
        run(shape)
    times: Dict[Shape, List[float]] = {shape: [] for shape in every}
    for _ in range(repeats):
        for shape in every:
            times[shape].append(run(shape))
    return times


_CACHE: Dict[Tuple, CopyCost] = {}


def copy_cost_cache_path() -> Path:
    """Where measurements are kept: ``$XDG_CACHE_HOME/januspipe`` (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "januspipe" / "copy_cost.json"


def _disk_key(key: Tuple) -> str:
    """The machine, its malloc settings and the probe: a measurement is reused only for
    the same of all three."""
    malloc = {v: os.environ[v] for v in USER_VARIABLES if v in os.environ}
    probe = [PROBE_VERSION, UNIT_MATRIX, [list(k) if isinstance(k, tuple) else k for k in key]]
    return json.dumps([platform.node(), os.cpu_count(), torch.__version__, malloc, probe])


def _read_disk(key: Tuple) -> Optional[CopyCost]:
    try:
        entry = json.loads(copy_cost_cache_path().read_text()).get(_disk_key(key))
        if entry and time.time() - float(entry["measured_at"]) < DISK_CACHE_TTL_S:
            return CopyCost(**entry["cost"])
    except (OSError, ValueError, TypeError, KeyError):  # no file, unreadable or from another version
        pass
    return None


def _write_disk(key: Tuple, cost: CopyCost) -> None:
    """Atomically add this measurement (a cache: failing to write it loses nothing)."""
    path = copy_cost_cache_path()
    try:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[_disk_key(key)] = {"measured_at": time.time(), "cost": asdict(cost)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("copy probe: could not cache the measurement in %s: %s", path, exc)


def measure_copy_cost(
    shapes: Sequence[Shape] = PROBE_SHAPES,
    units: int = PROBE_UNITS,
    repeats: int = PROBE_REPEATS,
    timeout_s: float = 120.0,
    disk_cache: bool = True,
) -> CopyCost:
    """What a gloo message costs a busy CPU rank: measured once per process, reused from
    disk for a day with ``disk_cache`` (the same machine, torch and probe)."""
    key = (tuple(shapes), units, repeats)
    if key in _CACHE:
        return _CACHE[key]
    cached = _read_disk(key) if disk_cache else None
    if cached is not None:
        log.info("copy cost from %s: %s", copy_cost_cache_path(), cached.describe())
        _CACHE[key] = cached
        return cached
    from .launch import launch_local

    t0 = time.perf_counter()
    results = launch_local(_probe_worker, 2, args=(tuple(shapes), units, repeats), timeout_s=timeout_s)
    extra: Dict[Shape, float] = {}
    for shape in shapes:
        # the pipeline waits for the slower rank
        extra[shape] = max((statistics.median(t[shape]) - statistics.median(t[(0, 0)])) / units for t in results)
    cost = fit_copy_cost(extra)
    unit = max(statistics.median(t[(0, 0)]) for t in results) / units
    log.info(
        "copy probe (%.1f s): compute unit %.2f ms, extra per unit %s -> %s",
        time.perf_counter() - t0, 1e3 * unit, {f"{n}x{s}B": f"{1e3 * t:.3f} ms" for (n, s), t in extra.items()}, cost.describe(),
    )
    _CACHE[key] = cost
    if disk_cache:
        _write_disk(key, cost)
    return cost
