"""Time the split (chunk, group) graphs as the runtime runs them.

The partitioner needs a time per node, and calibration (`passes/cost.py`) gives one:
each node timed alone under an interpreter, then fitted per op class. Summed over a
group those times are right in total but not per group: on SchNet (1008 atoms, P = 2)
the fit put the F and G groups at 1.5–2× and the GG and FB groups at 0.6–0.9× of what
running the group's graph takes. WaveK balances the phases against each other, so the
schedule is built on each group's own time: the group's ``GraphModule`` called on the
example micro-batch, in dependency order, as `runtime.executor.RankExecutor` calls it.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from .split import GroupKey, SplitPlan


def measure_group_times(
    runs: Sequence[Tuple[SplitPlan, Sequence[Any]]],
    device: Union[str, torch.device] = "cpu",
    repeats: int = 3,
) -> List[Dict[GroupKey, float]]:
    """Per (plan, flat inputs) pair, {(chunk, group): median seconds} of running each of
    the plan's group graphs once per repeat on those inputs (its joint graph's inputs for
    one micro-batch).

    Plans are run in turn within each repeat (plan 1, plan 2, plan 1, ...), so that a
    change in machine load spreads over all of them: the bench compares schedules whose
    partitions differ on times taken in one sitting. A warm-up run comes first; the
    garbage collector is off while timing (a collection would land on a random group).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = torch.device(device).type == "cuda"
    times_of: List[Dict[GroupKey, List[float]]] = [{key: [] for key in plan.order} for plan, _ in runs]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            for r in range(repeats + 1):
                for (plan, flat_inputs), times in zip(runs, times_of):
                    env: Dict[str, Any] = dict(zip(plan.input_names, flat_inputs))
                    for key in plan.order:
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
                        if r > 0:  # the first run warms up the allocator and kernels
                            times[key].append(elapsed)
                    env.clear()
    finally:
        if gc_was_enabled:
            gc.enable()
    return [{key: statistics.median(ts) for key, ts in times.items()} for times in times_of]
