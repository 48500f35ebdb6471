"""Time the split (chunk, group) graphs as the runtime runs them.

The partitioner needs a time per node, and calibration (`passes/cost.py`) gives one:
each node timed alone under an interpreter, then fitted per op class. Summed over a
group those times are right in total but not per group: on SchNet (1008 atoms, P = 2)
the fit put the F and G groups at 1.5–2× and the GG and FB groups at 0.6–0.9× of what
running the group's graph takes. WaveK balances the phases against each other, so the
schedule is built on each group's own time: the group's ``GraphModule`` called on the
example micro-batch, in dependency order, as `runtime.executor.RankExecutor` calls it.

On a CPU host the P ranks of a local run share the memory system: the same group runs
slower while another rank computes beside it (on two cores: PaiNN's split graphs at
1008 atoms 1.22-1.34x beside a loop streaming memory, a scatter-add 1.21x beside its
twin, a matmul 1.02x). ``contenders`` times the groups while that many other
processes run the same groups in a loop, as the other ranks of a local run would.
"""
from __future__ import annotations

import gc
import logging
import pickle
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .split import GroupKey, SplitPlan

log = logging.getLogger(__name__)

CONTENDER_START_TIMEOUT_S = 600.0


Runs = Sequence[Tuple[SplitPlan, Sequence[Any]]]


def _run_groups(
    plan: SplitPlan, flat_inputs: Sequence[Any], cuda: bool = False,
    record: Optional[Callable[[GroupKey, float], None]] = None, stop: Optional[Any] = None,
) -> None:
    """Run ``plan``'s group graphs once, in dependency order, as a rank's executor would;
    ``record(key, seconds)`` gets each group's time. Returns early once ``stop`` is set."""
    env: Dict[str, Any] = dict(zip(plan.input_names, flat_inputs))
    for key in plan.order:
        if stop is not None and stop.is_set():
            break
        group = plan.groups[key]
        args = [env[name] for name in group.inputs]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = group.gm(*args)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        env.update(zip(group.outputs, outs))
        args = outs = None
        if record is not None:
            record(key, elapsed)
    env.clear()


def _contend(runs_blob: bytes, ready: Any, stop: Any) -> None:
    """A contender process: run every plan's groups in turn until ``stop`` is set, as a
    rank of a local run would (one thread, the workers' malloc); ``ready`` once a whole
    pass ran (allocator and caches warm)."""
    from janus_compile.runtime.malloc_tuning import tune_malloc_for_tensors

    torch.set_num_threads(1)
    tune_malloc_for_tensors()
    runs = pickle.loads(runs_blob)
    with torch.no_grad():
        while not stop.is_set():
            for plan, flat_inputs in runs:
                _run_groups(plan, flat_inputs, stop=stop)
            ready.set()


def _start_contenders(runs: Runs, count: int) -> Tuple[list, Any]:
    """Start ``count`` contender processes and wait until each ran a whole pass. The runs
    go to them pickled by value: handed over as process arguments, every tensor would
    become a shared-memory segment (one file descriptor each, thousands for a bench's
    trainers)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    runs_blob = pickle.dumps(list(runs), protocol=pickle.HIGHEST_PROTOCOL)
    stop = ctx.Event()
    procs = []
    try:
        for _ in range(count):
            ready = ctx.Event()
            proc = ctx.Process(target=_contend, args=(runs_blob, ready, stop), daemon=True)
            proc.start()
            procs.append((proc, ready))
        deadline = time.monotonic() + CONTENDER_START_TIMEOUT_S
        for proc, ready in procs:
            while not ready.wait(0.5):
                if not proc.is_alive():
                    raise RuntimeError(
                        f"a contender process for group timing exited with code {proc.exitcode} before its first pass; "
                        "time without contenders (contenders=0) or see its traceback above"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"contender processes did not finish a pass within {CONTENDER_START_TIMEOUT_S:.0f} s")
    except BaseException:
        _stop_contenders([p for p, _ in procs], stop)
        raise
    log.info("timing groups beside %d contender process(es)", count)
    return [p for p, _ in procs], stop


def _check_contenders_alive(procs: list) -> None:
    """Raise if a contender died while the groups were timed: the times would then have
    been taken beside fewer processes than asked (and than the bench reports)."""
    dead = [proc for proc in procs if not proc.is_alive()]
    if dead:
        codes = ", ".join(str(proc.exitcode) for proc in dead)
        raise RuntimeError(
            f"{len(dead)} of {len(procs)} contender process(es) for group timing exited (code {codes}) while the groups "
            "were timed, so they were timed beside fewer processes than asked; see its traceback above, and time again "
            "with fewer contenders or none (contenders=0, --timing-contenders 0)"
        )


def _stop_contenders(procs: list, stop: Any) -> None:
    stop.set()
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()


def measure_group_times(
    runs: Runs,
    device: Union[str, torch.device] = "cpu",
    repeats: int = 3,
    contenders: int = 0,
) -> List[Dict[GroupKey, float]]:
    """Per (plan, flat inputs) pair, {(chunk, group): median seconds} of running each of
    the plan's group graphs once per repeat on those inputs (its joint graph's inputs for
    one micro-batch).

    Plans are run in turn within each repeat (plan 1, plan 2, plan 1, ...), so that a
    change in machine load spreads over all of them: the bench compares schedules whose
    partitions differ on times taken in one sitting. A warm-up run comes first; the
    garbage collector is off while timing (a collection would land on a random group).
    ``contenders`` (CPU only): that many spawned processes run the same groups in a loop
    while the timing runs, as the other ranks of a local run share the host (module
    docstring); they are stopped before this returns, on failure too, and one that died
    before the timing ended raises (the times would not be what was asked for).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if contenders < 0:
        raise ValueError(f"contenders must be >= 0, got {contenders}")
    cuda = torch.device(device).type == "cuda"
    if cuda and contenders:
        raise ValueError("contenders apply to CPU timing (ranks sharing a host); on CUDA each rank has its own device: pass contenders=0")
    times_of: List[Dict[GroupKey, List[float]]] = [{key: [] for key in plan.order} for plan, _ in runs]
    procs, stop = _start_contenders(runs, contenders) if contenders else ([], None)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            for r in range(repeats + 1):
                for (plan, flat_inputs), times in zip(runs, times_of):
                    # the first run warms up the allocator and kernels
                    _run_groups(plan, flat_inputs, cuda, record=(lambda k, t, ts=times: ts[k].append(t)) if r > 0 else None)
        _check_contenders_alive(procs)
    finally:
        if gc_was_enabled:
            gc.enable()
        if procs:
            _stop_contenders(procs, stop)
    return [{key: statistics.median(ts) for key, ts in times.items()} for times in times_of]
