"""Rebalancing: correct the partitioner's node times with the groups' measured times.

The partitioner balances ranks on a time per node (`passes/cost.py`: each node timed
alone, fitted per op class). Summed per (chunk, phase) group those times can be off by a
factor that differs from group to group: on NequIP (256 atoms, P = 2) the eight groups
ran at 0.70–1.12× their summed node times, so a split balanced to 1.09 max/mean on node
times measured 1.21 once its groups were run (`passes/group_timing.py`), and the
workers' traces agreed (rank 1 computing 1.35× rank 0). WaveK can only hide so much of
that: its simulated efficiency at M = 4P fell to 0.80 (SchNet, balanced: 0.93); with
the split solved again as below, 0.92 (docs/benchmarks.md, section A3).

The correction is one more solve on corrected times: every node's time scaled by its
group's measured/estimated ratio, so a node keeps the factor of the group it was in when
it moves. Both splits are then timed in one sitting (`CompiledMLIP.rebalanced`) and the
trainer keeps the one whose schedule simulates faster: the simulator also charges what
the new boundaries cost to send, which a balance of compute alone would not see.
"""
from __future__ import annotations

from typing import Any, Dict, List

REBALANCE_TARGET = 1.05
"""Measured max/mean rank time above which the partition is solved again on corrected
node times. Below it, the remaining imbalance is within what two timings of the same
groups differ by on a loaded machine (a few per cent)."""

REBALANCED_METHODS = ("symfold", "unfolded")
"""The methods that balance on node times (``even`` balances unit counts)."""


def measured_rank_times(partition: Any) -> List[float]:
    """Seconds per rank for one micro-batch, summed over its measured groups (empty
    without ``group_times``)."""
    return partition.rank_times(partition.group_times) if partition.group_times else []


def measured_imbalance(partition: Any) -> float:
    """max/mean of `measured_rank_times` (1.0 without group times)."""
    return partition.imbalance(partition.group_times) if partition.group_times else 1.0


def group_factors(partition: Any) -> Dict[Any, float]:
    """Measured/estimated seconds of every timed (chunk, phase) group with an estimate."""
    estimated = partition.chunk_phase_time()
    return {
        key: measured / estimated[key]
        for key, measured in partition.group_times.items()
        if estimated.get(key, 0.0) > 0 and measured > 0
    }


def corrected_node_times(partition: Any) -> Dict[str, float]:
    """The partition's node times, each scaled by its group's measured/estimated ratio
    (unchanged where the group was not timed)."""
    factors = group_factors(partition)
    placement = partition.plan.placement
    corrected = dict(partition.node_times)
    for name, chunk in placement.chunk.items():
        factor = factors.get((chunk, placement.phase[name]))
        if factor is not None and name in corrected:
            corrected[name] = corrected[name] * factor
    return corrected
