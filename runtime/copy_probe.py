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
extra time per unit is one sent and one received message on each rank. It is measured on
a grid of message shapes, 1, 8 and 64 tensors × 64 KiB, 1 MiB, 16 MiB and 64 MiB in
all (a compute unit grows with the message, so that it still has a whole unit to
arrive), and the simulator interpolates between them (`passes.copy_cost.MeasuredCopyCost`).
Three linear terms fitted on small messages, as this probe did before, charged a
pipeline's 100-tensor, 190 MiB boundary 81 ms where it costs 50 ms. The result is
cached per process and, for a day, on disk (`copy_cost_cache_path`), so that the CLI,
torchrun and repeated runs on one machine do not each spend the probe's ~20 s; delete
the file to measure again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from janus_compile.passes.copy_cost import CopyModel, MeasuredCopyCost, copy_cost_from_json
from .malloc_tuning import USER_VARIABLES

log = logging.getLogger(__name__)

Shape = Tuple[int, int]  # (tensors per message, bytes in all)
PROBE_TENSORS: Tuple[int, ...] = (1, 8, 64)
PROBE_BYTES: Tuple[int, ...] = (1 << 16, 1 << 20, 1 << 24, 1 << 26)
PROBE_UNITS = 16  # compute units (and messages each way) per timed run of small messages
PROBE_REPEATS = 3  # runs of each shape, interleaved; the median is kept
UNIT_MATRIX = 700  # float64 matmul side: ~7-10 ms on one core, so that a message of up to
# BYTES_PER_MATMUL has time to arrive and what is left is the CPU it takes
BYTES_PER_MATMUL = 8 << 20  # a larger message gets a unit of more matmuls
PROBE_VERSION = 3  # part of the disk cache's key: a changed probe measures again
DISK_CACHE_TTL_S = 24 * 3600.0  # how long a measurement on disk is reused


def _matmuls_per_unit(nbytes: int) -> int:
    return max(1, math.ceil(nbytes / BYTES_PER_MATMUL))


def _units_per_run(matmuls: int, units: int) -> int:
    """Fewer units of a larger size: a run of large messages stays ~1 s."""
    return max(8, units // matmuls)


def _probe_worker(rank: int, world: int, shapes: Sequence[Shape], units: int, repeats: int) -> Dict[Shape, float]:
    """Extra seconds per compute unit that each message shape costs this rank (the
    median over ``repeats`` runs, less the median of runs of the same units alone)."""
    peer = 1 - rank
    a = torch.rand(UNIT_MATRIX, UNIT_MATRIX, dtype=torch.float64)
    out = torch.empty_like(a)

    def tensors(shape: Shape, fill: float) -> List[torch.Tensor]:
        n, total = shape
        return [torch.full((total // n // 8,), fill, dtype=torch.float64) for _ in range(n)]

    send_bufs_of = {shape: tensors(shape, 1.0) for shape in shapes}

    def posted_receives(shape: Shape) -> List:
        # a fresh buffer per message, as the executor allocates one per received tensor:
        # whatever the allocator costs for that (page faults) is part of a message's cost
        n, total = shape
        return [dist.irecv(torch.empty(total // n // 8, dtype=torch.float64), src=peer) for _ in range(n)]

    def run(shape: Optional[Shape], matmuls: int, count: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if shape is None:
            for _ in range(count * matmuls):
                torch.mm(a, a, out=out)
        else:
            send_bufs = send_bufs_of[shape]
            recvs = posted_receives(shape)
            sent: List = []
            for i in range(count):
                for _ in range(matmuls):
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

    sizes = sorted({_matmuls_per_unit(s) for _, s in shapes})
    for shape in shapes:  # warm-up: allocations, connections
        run(shape, _matmuls_per_unit(shape[1]), 2)
    alone: Dict[int, List[float]] = {m: [] for m in sizes}
    times: Dict[Shape, List[float]] = {shape: [] for shape in shapes}
    for _ in range(repeats):
        for m in sizes:
            alone[m].append(run(None, m, _units_per_run(m, units)))
        for shape in shapes:
            m = _matmuls_per_unit(shape[1])
            times[shape].append(run(shape, m, _units_per_run(m, units)))
    extra = {}
    for shape in shapes:
        m = _matmuls_per_unit(shape[1])
        extra[shape] = (statistics.median(times[shape]) - statistics.median(alone[m])) / _units_per_run(m, units)
    return extra


_CACHE: Dict[Tuple, CopyModel] = {}


def copy_cost_cache_path() -> Path:
    """Where measurements are kept: ``$XDG_CACHE_HOME/januspipe`` (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "januspipe" / "copy_cost.json"


def _boot_id() -> str:
    """This kernel's boot id: containers on different hosts can share a host name and a
    home directory, never a boot id (empty where the kernel does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _disk_key(key: Tuple) -> str:
    """The machine, its malloc settings and the probe: a measurement is reused only for
    the same of all three."""
    malloc = {v: os.environ[v] for v in USER_VARIABLES if v in os.environ}
    probe = [PROBE_VERSION, UNIT_MATRIX, [list(k) if isinstance(k, tuple) else k for k in key]]
    return json.dumps([platform.node(), _boot_id(), os.cpu_count(), torch.__version__, malloc, probe])


def _read_disk(key: Tuple) -> Optional[CopyModel]:
    try:
        entry = json.loads(copy_cost_cache_path().read_text()).get(_disk_key(key))
        if entry and time.time() - float(entry["measured_at"]) < DISK_CACHE_TTL_S:
            return copy_cost_from_json(entry["cost"])
    except (OSError, ValueError, TypeError, KeyError):  # no file, unreadable or from another version
        pass
    return None


def _write_disk(key: Tuple, cost: CopyModel) -> None:
    """Atomically add this measurement (a cache: failing to write it loses nothing)."""
    path = copy_cost_cache_path()
    try:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[_disk_key(key)] = {"measured_at": time.time(), "cost": cost.to_json()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("copy probe: could not cache the measurement in %s: %s", path, exc)


def measure_copy_cost(
    tensors: Sequence[int] = PROBE_TENSORS,
    nbytes: Sequence[int] = PROBE_BYTES,
    units: int = PROBE_UNITS,
    repeats: int = PROBE_REPEATS,
    timeout_s: float = 300.0,
    disk_cache: bool = True,
) -> MeasuredCopyCost:
    """What a gloo message costs a busy CPU rank, on the grid ``tensors`` × ``nbytes``
    (total bytes per message): measured once per process, reused from disk for a day
    with ``disk_cache`` (the same machine, torch and probe)."""
    key = (tuple(tensors), tuple(nbytes), units, repeats)
    if key in _CACHE:
        return _CACHE[key]
    cached = _read_disk(key) if disk_cache else None
    if cached is not None:
        log.info("copy cost from %s: %s", copy_cost_cache_path(), cached.describe())
        _CACHE[key] = cached
        return cached
    from .launch import launch_local

    shapes = [(n, int(b)) for n in tensors for b in nbytes]
    bad = [s for s in shapes if s[1] // s[0] < 8]
    if bad:
        raise ValueError(f"copy probe: every tensor needs at least 8 bytes, got (tensors, bytes) {bad}")
    log.info("copy probe: measuring %d message shapes on two gloo processes (~20 s, once a day)", len(shapes))
    t0 = time.perf_counter()
    results = launch_local(_probe_worker, 2, args=(tuple(shapes), units, repeats), timeout_s=timeout_s)
    # the pipeline waits for the slower rank; a unit is one sent and one received message
    per_message = {shape: max(0.0, max(r[shape] for r in results) / 2) for shape in shapes}
    cost = MeasuredCopyCost(
        tuple(tensors), tuple(float(b) for b in nbytes), tuple(tuple(per_message[(n, int(b))] for b in nbytes) for n in tensors)
    )
    log.info(
        "copy probe (%.1f s): per message %s -> %s",
        time.perf_counter() - t0, {f"{n}x{b}B": f"{1e3 * t:.3f} ms" for (n, b), t in per_message.items()}, cost.describe(),
    )
    _CACHE[key] = cost
    if disk_cache:
        _write_disk(key, cost)
    return cost
