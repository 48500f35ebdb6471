"""1F1B's cuts moved to where its simulated step is shortest.

The unfolded (1F1B) baseline cuts the chain F_1..F_L, G_L..G_1 by a DP that balances
compute alone (`symfold._linear_cuts`). 1F1B keeps at most P micro-batches in flight, so
a micro-batch's round trip (every stage's compute plus every message on its way up and
back) bounds its throughput, and where a cut lands decides how many per-edge activations
ride that round trip. On PaiNN at P = 4 (H200 costs) the DP's cuts put ~110–145 MB per
micro-batch on three links of the round trip: 1F1B simulated 65.3 ms at M = P, where
cuts within three chain items of them give 45.5 ms (docs/benchmarks.md, section B12). A
baseline handicapped like that would flatter WaveK, so the cuts are searched.

The search is coordinate descent from the DP's cuts: each cut in turn moved by up to
``radius`` items, the move with the shortest simulated 1F1B step at M = 2P kept
(`wavek.evaluate_orders`, the simulator's timing without building programs), rounds
repeated until none helps or the time budget (`BUDGET_ILP_LIMITS` × the partitioner's
ILP time limit) is spent.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.fx as fx

from .split import UNFOLDED, split_graph
from .wavek import DEFAULT_LATENCY, PipelineDAG, evaluate_orders, one_f_one_b

log = logging.getLogger(__name__)

SEARCH_RADIUS = 3
"""Chain items a cut may move per try. PaiNN at P = 4: the best of all cuts within 3
items of the DP's gave a 30 % shorter step than the DP's own."""

SCORE_MICROBATCHES_PER_STAGE = 2
"""Cuts are scored at M = 2P, the middle of the M = P…4P the bench runs: the partitioner
does not know M, and the best cuts at M = P, 2P, 4P were within 3 items of each other."""

BUDGET_ILP_LIMITS = 20
"""The search's wall-time budget in ILP time limits (10 minutes at the default 30 s); it
stops sooner when no move helps. A round tries every cut: at P = 32 ~200 cut sets of
0.8 s each (SchNet, 64 blocks). PaiNN at P = 32 (48 blocks) converged in 523 s, 1F1B's
step 19–35 % shorter; stopped at 120 s it had reached 4 %. It scores with the links'
bandwidth and latency, not a CPU rank's copy cost (`copy_cost`)."""


def cuts_of(piece: Sequence[int]) -> List[int]:
    """Chain positions where a new stage starts."""
    return [k for k in range(1, len(piece)) if piece[k] != piece[k - 1]]


def piece_of(cuts: Sequence[int], items: int) -> List[int]:
    """Stage of every chain item for cut positions ``cuts`` (the inverse of `cuts_of`)."""
    piece, stage = [], 0
    for k in range(items):
        while stage < len(cuts) and k >= cuts[stage]:
            stage += 1
        piece.append(stage)
    return piece


def descend_cuts(
    score: Callable[[Tuple[int, ...]], float], start: Tuple[int, ...], items: int, budget_s: float, radius: int = SEARCH_RADIUS,
) -> Tuple[Tuple[int, ...], bool]:
    """Coordinate descent over cut positions in a chain of ``items``: each cut in turn
    moved by up to ``radius`` items, the move with the lowest ``score`` kept, rounds until
    none helps or ``budget_s`` seconds are spent. ``score`` should memoise: a round
    scores the cut sets of the last again. Returns the best cuts and whether the budget
    ran out first."""
    best, best_score = start, score(start)
    deadline = time.perf_counter() + budget_s
    improved, out_of_time = True, False
    while improved and not out_of_time:
        improved = False
        for i in range(len(best)):
            lo = best[i - 1] + 1 if i > 0 else 1
            hi = best[i + 1] - 1 if i + 1 < len(best) else items - 1
            tried: Dict[Tuple[int, ...], float] = {}
            for c in range(max(lo, best[i] - radius), min(hi, best[i] + radius) + 1):
                if time.perf_counter() >= deadline:
                    out_of_time = True
                    break
                cand = best[:i] + (c,) + best[i + 1 :]
                tried[cand] = score(cand)
            if tried:
                winner = min(tried, key=tried.__getitem__)
                if tried[winner] < best_score * (1 - 1e-9):
                    best, best_score, improved = winner, tried[winner], True
            if out_of_time:
                break
    return best, out_of_time


def refine_unfolded_cuts(
    gm: fx.GraphModule, partition: Any, time_limit_s: float, radius: int = SEARCH_RADIUS, latency_s: float = DEFAULT_LATENCY,
) -> Any:
    """``partition`` (unfolded, cut by the DP) with its cuts moved to where 1F1B's
    simulated step at M = 2P is shortest; the same partition when no move helps.
    ``time_limit_s``: the partitioner's ILP time limit (the budget is a multiple)."""
    from .symfold import _linear_cuts, unfolded_chain, unfolded_stage_of_nodes

    stages, units, problem = partition.stages, partition.units, partition.problem
    if stages < 2:
        return partition
    chain, cost = unfolded_chain(units, problem)
    n = len(chain)
    microbatches = SCORE_MICROBATCHES_PER_STAGE * stages
    scored: Dict[Tuple[int, ...], float] = {}

    def build(cuts: Tuple[int, ...], modules: bool = False) -> Any:
        override = unfolded_stage_of_nodes(gm.graph, units, chain, piece_of(cuts, n))
        plan = split_graph(gm, units, [0] * len(units.names), stages, UNFOLDED, chunk_override=override, build_modules=modules)
        return dataclasses.replace(partition, plan=plan)

    def score(cuts: Tuple[int, ...], part: Optional[Any] = None) -> float:
        if cuts not in scored:
            part = part if part is not None else build(cuts)
            dag = PipelineDAG.from_partition(part, microbatches, bandwidth_bytes_per_s=problem.bandwidth_bytes_per_s, latency_s=latency_s)
            scored[cuts] = evaluate_orders(dag, one_f_one_b(dag))
        return scored[cuts]

    start = tuple(cuts_of(_linear_cuts(cost, stages)))
    first = score(start, partition)
    budget = BUDGET_ILP_LIMITS * time_limit_s
    best, out_of_time = descend_cuts(score, start, n, budget, radius)
    if out_of_time:
        log.warning("1F1B cut search stopped at its %.0f s budget before it converged; a larger ILP time limit gives it more", budget)
    log.info(
        "1F1B cuts %s -> %s: simulated step at M=%d %.4g -> %.4g s (%d cut sets tried)",
        list(start), list(best), microbatches, first, scored[best], len(scored),
    )
    return partition if best == start else build(best, modules=True)
