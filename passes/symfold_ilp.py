"""SymFold partition ILP: assign forward *units* to the V = K·P pipeline chunks.

SymFold folds every backward node onto the chunk of the forward unit it differentiates,
so a unit's cost in all four phases (F energy forward, G force gradient, GG double
backward, FB backward of the forward) lands on one chunk. What has to be balanced is
therefore the per-rank sum of all four phases, where rank ``r`` holds the K chunks that
wave placement puts on it (`wave_rank`). This module is only the optimisation problem:
it knows nothing about torch graphs, so it can be tested and tuned on synthetic costs.

Model (pulp + the CBC bundled with it):

- ``x[u,c]`` = unit ``u`` on chunk ``c``; each unit on exactly one chunk;
- ``y[u,c]`` = "unit ``u`` sits on a chunk ``<= c``" = ``Σ_{k<=c} x[u,k]`` (binary). CBC
  branches on ``y``: "is the cut between chunks ``c`` and ``c+1`` before or after unit
  ``u``" splits the search far better than "is ``u`` on chunk ``c``" (40 units, P = 8,
  K = 2 solves 2-3x faster than with binary ``x``). ``x`` is the difference of two
  ordered binaries, so it is 0/1 in every integer solution without being declared so;
- units stay in their (topological) order: ``y[u+1,c] <= y[u,c]`` for every threshold
  ``c``, i.e. ``chunk(u) <= chunk(u+1)``. Every edge has ``src < dst``, so these chain
  constraints imply ``chunk(src) <= chunk(dst)`` for every edge (per-edge rows would be
  redundant). This disaggregated form is much tighter in the LP than
  ``Σ c·x[u,c] <= Σ c·x[u+1,c]`` (summing it over ``c`` gives that);
- with ``order="dag"`` the total order is relaxed to the data flow itself: one row
  ``y[dst,c] <= y[src,c]`` per unit edge and threshold, so a unit that only its later
  readers depend on (SchNet's filter network, PaiNN's message filter: functions of the
  geometry alone) may sit on any chunk before them. The chain is one such placement, so
  the relaxed optimum is never worse; it is tried when the chain misses the balance
  target (`passes/symfold.py`), warm-started from the chain's answer;
- every chunk gets at least one unit. With order, unit ``u`` can then only sit on chunks
  ``max(0, V-U+u) .. min(V-1, u)``, so variables outside that window are never created;
  this also fixes ``x[0,0] = 1`` and ``x[U-1,V-1] = 1`` (symmetry breaking);
- minimise ``T + comm_weight · Σ_edges bytes/bandwidth · transfers(e) / P`` with
  ``T >= T_r`` for every rank (``T_r``: the four-phase time of the rank's units).
  ``transfers`` is ``chunk(dst) - chunk(src)`` by default (``transfer_charge="per_chunk"``:
  linear, exact for neighbouring units, which span at most one chunk boundary, and a
  hop even where wave placement puts two consecutive chunks on one rank). With
  ``"once"`` a cut edge costs one transfer however far it reaches, as the runtime sends
  it: each far edge (a skip: geometry read by every block, the gradients sent back to
  it) gets a variable ``z_e >= x[dst,c] - x[src,c]`` for every chunk ``c`` it may take,
  1 exactly when ``dst`` sits on a later chunk. Per chunk makes far-reaching skips look
  dear, which can trade balance away (SchNet, P = 16, K = 2: max/mean 1.66); charged
  once, cuts through big neighbouring tensors get relatively cheaper, and on the
  balanced cases the simulated step was up to 8 % longer. So `partition_graph` uses
  "once" only where "per_chunk" misses the balance target (docs/partitioning.md);
- optional memory cap per rank: ``Σ x[u,c]·(4·param_bytes + stash_bytes·in_flight)``
  (parameters, gradients and two Adam moments, plus the stash of each in-flight
  micro-batch).

Scaling: in the written model, times (``T`` and the objective) are in units of the even
share ``Σ cost / P`` and memory rows are divided by the cap, so every coefficient is O(1).
That matters for CBC: its default cutoff increment is an absolute 1e-5 on the objective,
which on an objective of ~0.03 s would silently accept solutions 0.03 % off the optimum.
Here "optimal" means proven within 1e-5 of the even share (`MIP_INCREMENT`).

CBC runs single-threaded with a fixed seed so that the same input gives the same
assignment (unless the time limit cuts the search short: that limit is wall time, and a
CBC still inside an LP past it is stopped, `passes/solver_deadline.py`).
The better of the even split (`even_partition`) and a split at the cost quantiles, each
polished by a boundary-move local search, is handed to CBC as a MIP start when it fits
the memory cap, so a time-limited solve always has a feasible answer at least as good as
the baseline. When neither fits and the in-order splits are few (`ENUMERATION_LIMIT`),
every one is evaluated: the best that fits becomes the MIP start, and none fitting is a
proof of infeasibility that does not depend on CBC finishing within its time limit.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pulp

from .solver_deadline import solve_with_deadline

log = logging.getLogger(__name__)

PHASES: Tuple[str, ...] = ("F", "G", "GG", "FB")
"""Phases of a training step; the same names as `janus_compile.passes.labels.PHASES`
(not imported, so this module does not pull in torch)."""

OPTIMIZER_COPIES = 4
"""Copies of each parameter a rank holds: the weights, their gradients, two Adam moments."""

STATUS_OPTIMAL = "optimal"
STATUS_TIME_LIMIT = "feasible (time limit)"
STATUS_EVEN = "even (no solver)"
STATUS_SOLVER_FAILED = "MIP start (solver failed)"
ORDERS: Tuple[str, ...] = ("chain", "dag")


class PartitionError(ValueError):
    """The partition problem has no answer as posed; the message says what to change."""


@dataclass
class Unit:
    """A coarse group of forward nodes (e.g. one interaction block), moved as a whole.

    ``cost`` is seconds per phase (keys among ``F``, ``G``, ``GG``, ``FB``; a missing
    phase costs 0) for one micro-batch; ``stash_bytes`` is the activation memory kept per
    in-flight micro-batch.
    """

    name: str
    cost: Dict[str, float]
    param_bytes: float = 0.0
    stash_bytes: float = 0.0

    def total_cost(self) -> float:
        """Seconds of all four phases: the fold puts them all on the unit's chunk."""
        return float(sum(self.cost.get(p, 0.0) for p in PHASES))

    def memory(self, microbatches_in_flight: int) -> float:
        """Bytes this unit pins on its rank: optimizer state plus in-flight stashes."""
        return OPTIMIZER_COPIES * self.param_bytes + self.stash_bytes * microbatches_in_flight


@dataclass
class UnitEdge:
    """Forward data flow ``src -> dst`` (indices into the units; ``src < dst``)."""

    src: int
    dst: int
    bytes: float


@dataclass
class PartitionProblem:
    """Units in topological order, their data flow, and the pipeline shape (P stages, K chunks each)."""

    units: List[Unit]
    edges: List[UnitEdge]
    stages: int
    chunks: int
    microbatches_in_flight: int = 1
    memory_cap_bytes: Optional[float] = None
    bandwidth_bytes_per_s: float = 10e9
    comm_weight: float = 1.0
    # Weight of the slowest chunk in the objective (K > 1 only). Rank balance alone leaves
    # many optima, some with one heavy and one empty chunk per rank, which is a K = 1
    # pipeline with extra hops; a wave pipeline's fill and drain shrink with the chunk
    # size, so among (nearly) equally balanced ranks this prefers equal chunks.
    chunk_weight: float = 0.1
    time_limit_s: float = 30.0
    seed: int = 0
    # "per_chunk" (default): an edge costs one transfer per chunk boundary it crosses,
    # linear in the chunk indices; "once": one transfer however far it reaches, as the
    # runtime sends it. `partition_graph` re-solves with "once" when the default misses
    # the balance target (docs/partitioning.md says why both).
    transfer_charge: str = "per_chunk"
    # "chain": chunks are contiguous runs of the unit order; "dag": any placement that
    # keeps every unit edge pointing up the chunks (see the module docstring)
    order: str = "chain"

    @property
    def num_chunks(self) -> int:
        """V = K·P, the number of pipeline chunks."""
        return self.stages * self.chunks

    @property
    def seconds_per_byte_sent(self) -> float:
        """What one byte sent to another chunk adds to the objective.

        Transfers are asynchronous and spread over the ranks: the runtime overlaps them
        with compute, and each rank carries only its own boundaries. So the objective
        charges the *per-rank mean* of the transfer time (total / P), not the total,
        which would make any cut inside a block (per-edge tensors) look P times too dear.
        """
        return self.comm_weight / self.bandwidth_bytes_per_s / self.stages


@dataclass
class PartitionSolution:
    """An assignment of units to chunks and what it costs per chunk and per rank."""

    chunk_of_unit: List[int]
    status: str
    objective: float
    bound: Optional[float]
    gap: Optional[float]
    rank_time: List[float]
    rank_memory: List[float]
    chunk_time: List[Dict[str, float]]
    solve_seconds: float
    lp_text: str = ""
    num_variables: int = 0
    num_constraints: int = 0

    @property
    def imbalance(self) -> float:
        """max/mean rank time: 1.0 is a perfect balance."""
        mean = sum(self.rank_time) / len(self.rank_time)
        return max(self.rank_time) / mean if mean > 0 else 1.0

    def chunk_imbalance(self) -> float:
        """max/mean chunk time (all four phases): what a wave pipeline's fill and drain see."""
        totals = [sum(ct.values()) for ct in self.chunk_time]
        mean = sum(totals) / len(totals) if totals else 0.0
        return max(totals) / mean if mean > 0 else 1.0


def wave_rank(chunk: int, stages: int) -> int:
    """Rank holding ``chunk`` under wave placement: chunk ``w·P + i`` is on rank ``i`` for
    even ``w`` and on rank ``P-1-i`` for odd ``w``, so the last chunk of one wave and the
    first of the next share a rank (no transfer at the turn)."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    wave, i = divmod(chunk, stages)
    return i if wave % 2 == 0 else stages - 1 - i


# ---------------------------------------------------------------------------------------
# validation and evaluation


def _validate(problem: PartitionProblem) -> None:
    """Reject malformed input early, with the figure that is wrong."""
    if problem.stages < 1 or problem.chunks < 1:
        raise PartitionError(f"stages (P={problem.stages}) and chunks (K={problem.chunks}) must be >= 1")
    n, v = len(problem.units), problem.num_chunks
    if n < v:
        raise PartitionError(
            f"cannot fill V = K·P = {problem.chunks}·{problem.stages} = {v} chunks with only {n} units: "
            f"every chunk needs at least one unit. Use fewer stages or chunks per stage "
            f"(K·P <= {n}), or split the model into finer units."
        )
    for k, u in enumerate(problem.units):
        bad = set(u.cost) - set(PHASES)
        if bad:
            raise PartitionError(f"unit {k} ({u.name!r}) has costs for unknown phases {sorted(bad)}; expected {PHASES}")
        for p, c in u.cost.items():
            if not (math.isfinite(c) and c >= 0):
                raise PartitionError(f"unit {k} ({u.name!r}) phase {p} cost must be finite and >= 0, got {c}")
        for what, b in (("param_bytes", u.param_bytes), ("stash_bytes", u.stash_bytes)):
            if not (math.isfinite(b) and b >= 0):
                raise PartitionError(f"unit {k} ({u.name!r}) {what} must be finite and >= 0, got {b}")
    for e in problem.edges:
        if not (0 <= e.src < e.dst < n):
            raise PartitionError(
                f"edge {e.src} -> {e.dst} is not forward between units 0..{n - 1} (src must precede dst)"
            )
        if not (math.isfinite(e.bytes) and e.bytes >= 0):
            raise PartitionError(f"edge {e.src} -> {e.dst} bytes must be finite and >= 0, got {e.bytes}")
    if problem.microbatches_in_flight < 0:
        raise PartitionError(f"microbatches_in_flight must be >= 0, got {problem.microbatches_in_flight}")
    if not (math.isfinite(problem.comm_weight) and problem.comm_weight >= 0):
        raise PartitionError(f"comm_weight must be finite and >= 0, got {problem.comm_weight}")
    if not problem.bandwidth_bytes_per_s > 0:
        raise PartitionError(f"bandwidth_bytes_per_s must be > 0, got {problem.bandwidth_bytes_per_s}")
    if not problem.time_limit_s > 0:
        raise PartitionError(f"time_limit_s must be > 0, got {problem.time_limit_s}")
    if problem.order not in ORDERS:
        raise PartitionError(f"order must be one of {ORDERS}, got {problem.order!r}")
    if problem.transfer_charge not in TRANSFER_CHARGES:
        raise PartitionError(f"transfer_charge must be one of {TRANSFER_CHARGES}, got {problem.transfer_charge!r}")


def _memory_lower_bound(problem: PartitionProblem) -> float:
    """Smallest per-rank memory any partition can reach: the even share, the biggest unit,
    or the ⌈U/P⌉ smallest units (some rank holds at least that many units; it is at least
    K, since each of a rank's K chunks holds one). The count matters when units weigh
    alike: 9 equal units on 2 ranks need 5 on one, not 4.5."""
    mem = sorted(u.memory(problem.microbatches_in_flight) for u in problem.units)
    most_units = -(-len(mem) // problem.stages)
    return max(sum(mem) / problem.stages, mem[-1], sum(mem[: max(most_units, problem.chunks)]))


ENUMERATION_LIMIT = 20_000
"""In-order splits (C(U-1, V-1)) worth evaluating one by one when no MIP start fits the
memory cap: ~30 µs each, so under a second. Such a problem is either infeasible, which CBC
may not prove within its time limit on a loaded machine (a pigeonhole over alike units),
or tight, and enumeration answers both exactly."""


def _best_chain_split(problem: PartitionProblem) -> Tuple[Optional[List[int]], int]:
    """The in-order split with the lowest objective under the memory cap (None if none
    fits), found by evaluating every one; and how many were evaluated."""
    n, v = len(problem.units), problem.num_chunks
    cap = problem.memory_cap_bytes
    best: Optional[Tuple[float, List[int]]] = None
    tried = 0
    for inner in itertools.combinations(range(1, n), v - 1):
        cuts = (0, *inner, n)
        chunk_of_unit = [k for k in range(v) for _ in range(cuts[k], cuts[k + 1])]
        tried += 1
        objective, _, rank_memory, _ = _evaluate(problem, chunk_of_unit)
        if cap is not None and max(rank_memory) > cap:
            continue
        if best is None or objective < best[0]:
            best = (objective, chunk_of_unit)
    return (best[1] if best else None), tried


def _can_enumerate(problem: PartitionProblem) -> bool:
    return problem.order == "chain" and math.comb(len(problem.units) - 1, problem.num_chunks - 1) <= ENUMERATION_LIMIT


def _memory_error(problem: PartitionProblem, lower: float, proven: bool, proof: str = "CBC") -> PartitionError:
    """The message for a memory cap that no in-order partition meets, with the figures."""
    if proven:
        need = (
            f"{proof} proved that no in-order partition with non-empty chunks fits; the simple lower "
            f"bound is {lower:.6g} B per rank"
        )
    else:
        need = f"every partition needs at least {lower:.6g} B on some rank"
    return PartitionError(
        f"memory_cap_bytes = {problem.memory_cap_bytes:.6g} B per rank is too small: {need} "
        f"(params·{OPTIMIZER_COPIES} + stash·{problem.microbatches_in_flight} in-flight micro-batches, "
        f"{len(problem.units)} units over P = {problem.stages} ranks). "
        f"Use more stages, fewer in-flight micro-batches, or a larger cap."
    )


TRANSFER_CHARGES = ("per_chunk", "once")


def _is_far(problem: PartitionProblem, e: UnitEdge) -> bool:
    """Whether edge ``e`` needs a cut variable: charged once and able to skip chunks
    (units not next to each other in the chain, or any edge of the data-flow order;
    neighbours in the chain span at most one boundary, every chunk holding a unit)."""
    return problem.transfer_charge == "once" and (problem.order == "dag" or e.dst - e.src > 1)


def _transfers(problem: PartitionProblem, src_chunk: int, dst_chunk: int) -> int:
    """Transfers charged for an edge from ``src_chunk`` up to ``dst_chunk``."""
    if problem.transfer_charge == "once":
        return int(dst_chunk != src_chunk)
    return dst_chunk - src_chunk


def _comm_seconds(problem: PartitionProblem, chunk_of_unit: Sequence[int]) -> float:
    """Transfer seconds charged to the objective, per rank (see `transfer_charge`)."""
    return problem.seconds_per_byte_sent * sum(
        e.bytes * _transfers(problem, chunk_of_unit[e.src], chunk_of_unit[e.dst]) for e in problem.edges
    )


def _evaluate(
    problem: PartitionProblem, chunk_of_unit: Sequence[int]
) -> Tuple[float, List[float], List[float], List[Dict[str, float]]]:
    """Objective, rank times, rank memories and per-chunk phase times of an assignment."""
    v, p = problem.num_chunks, problem.stages
    chunk_time: List[Dict[str, float]] = [{ph: 0.0 for ph in PHASES} for _ in range(v)]
    rank_time = [0.0] * p
    rank_memory = [0.0] * p
    for u, c in zip(problem.units, chunk_of_unit):
        r = wave_rank(c, p)
        for ph in PHASES:
            chunk_time[c][ph] += float(u.cost.get(ph, 0.0))
        rank_time[r] += u.total_cost()
        rank_memory[r] += u.memory(problem.microbatches_in_flight)
    objective = max(rank_time) + _comm_seconds(problem, chunk_of_unit)
    if _weighs_chunks(problem):
        objective += problem.chunk_weight * max(sum(ct.values()) for ct in chunk_time)
    return objective, rank_time, rank_memory, chunk_time


def _weighs_chunks(problem: PartitionProblem) -> bool:
    return problem.chunks > 1 and problem.chunk_weight > 0


def even_partition(problem: PartitionProblem) -> PartitionSolution:
    """Baseline without a solver: equal unit counts per chunk (±1), in order.

    It ignores costs and the memory cap; it is what SymFold has to beat, and one of the
    MIP starts handed to CBC."""
    t0 = time.perf_counter()
    _validate(problem)
    n, v = len(problem.units), problem.num_chunks
    chunk_of_unit = [u * v // n for u in range(n)]
    objective, rank_time, rank_memory, chunk_time = _evaluate(problem, chunk_of_unit)
    return PartitionSolution(
        chunk_of_unit=chunk_of_unit,
        status=STATUS_EVEN,
        objective=objective,
        bound=None,
        gap=None,
        rank_time=rank_time,
        rank_memory=rank_memory,
        chunk_time=chunk_time,
        solve_seconds=time.perf_counter() - t0,
    )


def _cost_quantile_start(problem: PartitionProblem) -> List[int]:
    """In-order split with cuts nearest the cost quantiles k·Σcost/V: every chunk close to
    the same time, so every rank close to the even share. A better MIP start than the even
    unit count when unit costs differ; CBC's own heuristics find such splits slowly."""
    n, v = len(problem.units), problem.num_chunks
    prefix = [0.0]
    for u in problem.units:
        prefix.append(prefix[-1] + u.total_cost())
    total = prefix[-1]
    cuts = [0]  # cuts[k] = index of the first unit of chunk k
    for k in range(1, v):
        lo, hi = cuts[-1] + 1, n - (v - k)  # leave a unit for this and every later chunk
        target = total * k / v
        cuts.append(min(range(lo, hi + 1), key=lambda i: (abs(prefix[i] - target), i)))
    cuts.append(n)
    return [k for k in range(v) for _ in range(cuts[k], cuts[k + 1])]


def _polish(problem: PartitionProblem, chunk_of_unit: List[int], max_evals: int) -> List[int]:
    """Local search for a MIP start: shift one or two chunk boundaries by one unit each
    while that lowers (objective, Σ rank_time²) and keeps the memory cap.

    Single moves stall quickly: unloading the busiest rank loads a neighbour chunk that
    sits on another rank; moving two boundaries lets a unit travel on. The second key walks
    across plateaus of the max. On 60 units of mixed cost (P = 8, K = 2) this finds in
    well under a second what CBC reaches in ~30 s from the even split. The budget counts
    evaluations, not seconds, so that the start (and the answer) is repeatable."""
    n, v, p = len(chunk_of_unit), problem.num_chunks, problem.stages
    cap = problem.memory_cap_bytes
    mif = problem.microbatches_in_flight
    rank_of = [wave_rank(c, p) for c in range(v)]
    pre_t, pre_m = [0.0], [0.0]
    for u in problem.units:
        pre_t.append(pre_t[-1] + u.total_cost())
        pre_m.append(pre_m[-1] + u.memory(mif))
    sent = [(e.src, e.dst, problem.seconds_per_byte_sent * e.bytes) for e in problem.edges if e.bytes > 0]
    chunk_w = problem.chunk_weight if _weighs_chunks(problem) else 0.0

    def score(cuts: List[int]) -> Optional[Tuple[float, float]]:
        rank_time, rank_mem = [0.0] * p, [0.0] * p
        for c in range(v):
            rank_time[rank_of[c]] += pre_t[cuts[c + 1]] - pre_t[cuts[c]]
            rank_mem[rank_of[c]] += pre_m[cuts[c + 1]] - pre_m[cuts[c]]
        if cap is not None and max(rank_mem) > cap:
            return None
        comm = sum(s * _transfers(problem, bisect.bisect_right(cuts, a), bisect.bisect_right(cuts, b)) for a, b, s in sent)
        chunk = chunk_w * max(pre_t[cuts[c + 1]] - pre_t[cuts[c]] for c in range(v)) if chunk_w else 0.0
        return max(rank_time) + comm + chunk, sum(t * t for t in rank_time)

    cuts = [chunk_of_unit.index(k) for k in range(v)] + [n]
    best = score(cuts)
    if best is None:
        return chunk_of_unit
    moves = [((k, d),) for k in range(1, v) for d in (-1, 1)]
    moves += [((k, d), (j, e)) for k in range(1, v) for j in range(k + 1, v) for d in (-1, 1) for e in (-1, 1)]
    evals, improved = 0, True
    while improved and evals < max_evals:
        improved = False
        for move in moves:
            trial = list(cuts)
            for k, d in move:
                trial[k] += d
            if any(not trial[k - 1] < trial[k] < trial[k + 1] for k, _ in move):
                continue
            s = score(trial)
            evals += 1
            if s is not None and s < best:
                cuts, best, improved = trial, s, True
            if evals >= max_evals:
                log.debug("MIP start polish stopped after its budget of %d evaluations", max_evals)
                break
    return [k for k in range(v) for _ in range(cuts[k], cuts[k + 1])]


def _is_placement(problem: PartitionProblem, chunk_of_unit: Sequence[int]) -> bool:
    """Whether an assignment is one the ILP allows: every chunk used, every unit edge
    pointing up (or staying), in order for the chain, under the memory cap."""
    n, v = len(problem.units), problem.num_chunks
    if len(chunk_of_unit) != n or set(chunk_of_unit) != set(range(v)):
        return False
    if problem.order == "chain" and any(a > b for a, b in zip(chunk_of_unit, chunk_of_unit[1:])):
        return False
    if any(chunk_of_unit[e.src] > chunk_of_unit[e.dst] for e in problem.edges):
        return False
    cap = problem.memory_cap_bytes
    return cap is None or max(_evaluate(problem, chunk_of_unit)[2]) <= cap


def _mip_start(problem: PartitionProblem, initial: Optional[Sequence[int]] = None) -> Optional[List[int]]:
    """The best split that fits the memory cap among the even and the cost-quantile split,
    each polished by boundary moves, and ``initial`` (an earlier answer) where it is a
    valid placement; None if none fits."""
    cap = problem.memory_cap_bytes
    best: Optional[Tuple[float, List[int]]] = None
    if initial is not None and _is_placement(problem, initial):
        best = (_evaluate(problem, initial)[0], list(initial))
    # ~0.5 s per start at the 30 s default (an evaluation costs ~(V + edges) µs); CBC gets the rest
    max_evals = int(min(1.0, 0.02 * problem.time_limit_s) * 1e6 / (problem.num_chunks + len(problem.edges) + 1))
    for cand in (even_partition(problem).chunk_of_unit, _cost_quantile_start(problem)):
        cand = _polish(problem, cand, max(max_evals, 1))
        objective, _, rank_memory, _ = _evaluate(problem, cand)
        if cap is not None and max(rank_memory) > cap:
            continue
        if best is None or objective < best[0]:
            best = (objective, cand)
    return best[1] if best else None


# ---------------------------------------------------------------------------------------
# the model


@dataclass
class _Model:
    prob: pulp.LpProblem
    x: Dict[Tuple[int, int], pulp.LpVariable]
    y: Dict[Tuple[int, int], pulp.LpVariable]
    t: pulp.LpVariable
    tc: Optional[pulp.LpVariable]  # slowest chunk (only when the objective weighs chunks)
    windows: List[List[int]]
    time_scale: float  # seconds per unit of the model's objective


def _window(u: int, n: int, v: int, order: str = "chain") -> range:
    """Chunks unit ``u`` can take: with units in order and no chunk empty, the chain
    leaves it ``V - U + u .. u``; the data-flow order leaves every chunk open."""
    if order == "dag":
        return range(v)
    return range(max(0, v - n + u), min(v - 1, u) + 1)


def _time_scale(problem: PartitionProblem) -> float:
    """Seconds per model time unit: the even share Σ cost / P (1 s if all costs are 0)."""
    share = sum(u.total_cost() for u in problem.units) / problem.stages
    return share if share > 0 else 1.0


def _new_var(prob: pulp.LpProblem, name: str, low: Optional[float], up: Optional[float], cat: str) -> pulp.LpVariable:
    """A variable of ``prob``: PuLP 3 deprecates free-standing ``LpVariable(...)`` in favour
    of ``prob.add_variable``, which PuLP 2.8 (still allowed by pyproject) lacks."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


def _build(problem: PartitionProblem, relax: bool = False) -> _Model:
    """The SymFold ILP (or its LP relaxation, a valid lower bound, when ``relax``)."""
    n, v, p = len(problem.units), problem.num_chunks, problem.stages
    prob = pulp.LpProblem("symfold_relaxed" if relax else "symfold", pulp.LpMinimize)
    windows = [list(_window(u, n, v, problem.order)) for u in range(n)]
    x = {
        (u, c): _new_var(prob, f"x_u{u}_c{c}", 0, 1, pulp.LpContinuous)
        for u in range(n)
        for c in windows[u]
    }
    ycat = pulp.LpContinuous if relax else pulp.LpBinary
    y = {
        (u, c): _new_var(prob, f"y_u{u}_c{c}", 0, 1, ycat)
        for u in range(n)
        for c in windows[u][:-1]
    }
    scale = _time_scale(problem)
    # T can not drop below the even share (1 here) or the heaviest unit: free tightening.
    t = _new_var(prob, "T", _rank_time_bound(problem) / scale, None, pulp.LpContinuous)

    def chunk_expr(u: int) -> pulp.LpAffineExpression:
        # Written on x (not y) so that the objective has no constant term: CBC leaves an
        # MPS objective constant out of its progress lines, which would skew the bound.
        return pulp.lpSum(c * x[u, c] for c in windows[u] if c > 0)

    byte_s = problem.seconds_per_byte_sent / scale
    sent = [e for e in problem.edges if e.bytes > 0]
    near = [e for e in sent if not _is_far(problem, e)]
    cut = {i: _new_var(prob, f"cut_e{i}", 0, 1, pulp.LpContinuous) for i, e in enumerate(sent) if _is_far(problem, e)}
    comm = pulp.lpSum(e.bytes * byte_s * (chunk_expr(e.dst) - chunk_expr(e.src)) for e in near) + pulp.lpSum(
        sent[i].bytes * byte_s * z for i, z in cut.items()
    )
    tc = None
    if _weighs_chunks(problem):
        tc = _new_var(prob, "T_chunk", _chunk_time_bound(problem) / scale, None, pulp.LpContinuous)
        prob += t + comm + problem.chunk_weight * tc, "rank_time_plus_comm_plus_chunk"
    else:
        prob += t + comm, "rank_time_plus_comm"

    for u in range(n):
        w = windows[u]
        prob += pulp.lpSum(x[u, c] for c in w) == 1, f"assign_u{u}"
        for i, c in enumerate(w[:-1]):
            prev = y[u, w[i - 1]] if i > 0 else 0
            prob += y[u, c] - prev - x[u, c] == 0, f"prefix_u{u}_c{c}"
    if problem.order == "dag":
        for src, dst in sorted({(e.src, e.dst) for e in problem.edges}):  # full windows: y for 0 .. V-2
            for c in range(v - 1):
                prob += y[dst, c] - y[src, c] <= 0, f"flow_u{src}_u{dst}_c{c}"
    else:
        for u in range(n - 1):
            # c in [first chunk of u+1, last chunk of u): other thresholds are trivially met.
            for c in range(windows[u + 1][0], windows[u][-1]):
                prob += y[u + 1, c] - y[u, c] <= 0, f"order_u{u}_c{c}"
    for i, z in cut.items():
        # dst on chunk c and src not: the edge is cut (chunk(src) <= chunk(dst) always)
        e = sent[i]
        for c in windows[e.dst]:
            prob += x[e.dst, c] - (x[e.src, c] if (e.src, c) in x else 0) - z <= 0, f"cut_e{i}_c{c}"
    units_on: List[List[int]] = [[] for _ in range(v)]
    for (u, c) in x:
        units_on[c].append(u)
    for c in range(v):
        prob += pulp.lpSum(x[u, c] for u in units_on[c]) >= 1, f"nonempty_c{c}"
        if tc is not None:
            prob += pulp.lpSum(problem.units[u].total_cost() / scale * x[u, c] for u in units_on[c]) - tc <= 0, f"chunk_time_c{c}"

    chunks_of_rank: List[List[int]] = [[] for _ in range(p)]
    for c in range(v):
        chunks_of_rank[wave_rank(c, p)].append(c)
    cap = problem.memory_cap_bytes
    mif = problem.microbatches_in_flight
    for r in range(p):
        on_rank = [(u, c) for c in chunks_of_rank[r] for u in units_on[c]]
        prob += (
            pulp.lpSum(problem.units[u].total_cost() / scale * x[u, c] for u, c in on_rank) - t <= 0,
            f"rank_time_r{r}",
        )
        if cap is not None and cap > 0:
            prob += (
                pulp.lpSum(problem.units[u].memory(mif) / cap * x[u, c] for u, c in on_rank) <= 1,
                f"rank_memory_r{r}",
            )
        elif cap is not None:  # a zero cap: only zero-memory units fit
            prob += (
                pulp.lpSum(problem.units[u].memory(mif) * x[u, c] for u, c in on_rank) <= 0,
                f"rank_memory_r{r}",
            )
    return _Model(prob=prob, x=x, y=y, t=t, tc=tc, windows=windows, time_scale=scale)


MIP_INCREMENT = 1e-5
"""CBC cutoff increment on the normalised objective: "optimal" is within this of the best."""


def cbc_deadline_s(time_limit_s: float) -> float:
    """Wall seconds after which a CBC run given ``time_limit_s`` is stopped: CBC itself
    stops near its limit except inside an LP (`passes/solver_deadline.py`)."""
    return 2.0 * time_limit_s + 10.0


def _solver(problem: PartitionProblem, time_limit: float, log_path: str, tmp_dir: str, warm: bool, mip: bool = True) -> pulp.PULP_CBC_CMD:
    """CBC, single-threaded with a fixed seed: repeatable unless the time limit bites.
    ``tmp_dir``: where pulp writes the model for CBC (a directory of this solve alone, so
    that `solve_with_deadline` can find its CBC process).

    CBC reads a seed of 0 as "use the time of day", so seeds are shifted by one."""
    seed = int(problem.seed) % 2_147_483_646 + 1
    # PuLP 3 deprecates PULP_CBC_CMD (the bundled binary) in favour of a separately
    # installed CBC behind COIN_CMD; the bundled one is what every install here has.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PULP_CBC_CMD is deprecated", category=DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(
            mip=mip,
            msg=False,
            timeLimit=time_limit,
            threads=1,
            warmStart=warm,
            logPath=log_path,
            options=[f"randomSeed {seed}", f"randomCbcSeed {seed}", f"increment {MIP_INCREMENT}"],
        )
    solver.tmpDir = tmp_dir
    return solver


def _file_tail(path: str, chars: int = 300) -> str:
    """The end of a solver log, for an error message ('' when there is none)."""
    try:
        with open(path) as f:
            return f.read()[-chars:].strip()
    except OSError:
        return ""


_BEST_POSSIBLE_RE = re.compile(r"best possible\s+([-+0-9.eE]+)")
_LOWER_BOUND_RE = re.compile(r"^Lower bound:\s*([-+0-9.eE]+)", re.MULTILINE)


def _cbc_lower_bound(log_text: str) -> Optional[float]:
    """CBC's best bound (normalised) from its log, or None.

    The progress lines ("best possible ...") carry full precision; the summary's "Lower
    bound:" is rounded to a few digits, so it is only the fallback."""
    for pattern in (_BEST_POSSIBLE_RE, _LOWER_BOUND_RE):
        found = pattern.findall(log_text)
        if found:
            try:
                return float(found[-1])
            except ValueError:
                continue
    return None


def _rank_time_bound(problem: PartitionProblem) -> float:
    """Seconds: max rank time can not drop below the even share or the heaviest unit."""
    costs = [u.total_cost() for u in problem.units]
    return max(sum(costs) / problem.stages, max(costs))


def _chunk_time_bound(problem: PartitionProblem) -> float:
    """Seconds: the slowest chunk takes at least the even chunk share or the heaviest unit."""
    costs = [u.total_cost() for u in problem.units]
    return max(sum(costs) / problem.num_chunks, max(costs))


def _combinatorial_bound(problem: PartitionProblem) -> float:
    """Seconds: a lower bound on the objective (rank and chunk bounds; transfers cost >= 0)."""
    bound = _rank_time_bound(problem)
    if _weighs_chunks(problem):
        bound += problem.chunk_weight * _chunk_time_bound(problem)
    return bound


def _relaxation_bound(problem: PartitionProblem, time_limit: float, tmp: str) -> Optional[float]:
    """Seconds: optimum of the LP relaxation, a valid lower bound only when proven optimal."""
    model = _build(problem, relax=True)
    limit = max(time_limit, 1.0)
    solver = _solver(problem, limit, os.path.join(tmp, "relax.log"), tmp, warm=False, mip=False)
    try:
        status = solve_with_deadline(lambda: model.prob.solve(solver), tmp, cbc_deadline_s(limit))
    except pulp.PulpSolverError as exc:  # CBC exited with an error: the answer stands, without this bound
        log.warning("CBC failed on the LP relaxation (%s); no bound from it", exc)
        return None
    if status is None or pulp.LpStatus[status] != "Optimal":
        log.debug("LP relaxation not solved to optimality (%s); no bound from it", "stopped" if status is None else pulp.LpStatus[status])
        return None
    return float(pulp.value(model.prob.objective) or 0.0) * model.time_scale


def solve_partition(
    problem: PartitionProblem, lp_path: Optional[str] = None, initial: Optional[Sequence[int]] = None
) -> PartitionSolution:
    """Solve the SymFold ILP for ``problem``; write the model to ``lp_path`` if given.
    ``initial`` (a chunk per unit, e.g. the chain's answer for ``order="dag"``) joins the
    MIP starts when it is a valid placement, so the answer is never worse than it.

    Raises `PartitionError` when there are fewer units than chunks, when no in-order
    partition meets the memory cap, or when CBC hits the time limit without a feasible
    assignment. A feasible but unproven answer comes back with status
    ``"feasible (time limit)"`` and its gap to the best lower bound known; when CBC exits
    with an error, the MIP start comes back with status `STATUS_SOLVER_FAILED`."""
    t0 = time.perf_counter()
    _validate(problem)
    n, v = len(problem.units), problem.num_chunks
    if problem.memory_cap_bytes is not None:
        lower = _memory_lower_bound(problem)
        if lower > problem.memory_cap_bytes:
            raise _memory_error(problem, lower, proven=False)

    model = _build(problem)
    prob = model.prob
    num_vars, num_cons = len(prob.variables()), prob.numConstraints()

    baseline = even_partition(problem)
    start = _mip_start(problem, initial)
    if start is None and problem.memory_cap_bytes is not None and _can_enumerate(problem):
        start, tried = _best_chain_split(problem)
        if start is None:
            raise _memory_error(
                problem, _memory_lower_bound(problem), proven=True,
                proof=f"evaluating all {tried} in-order splits",
            )
        log.info("no polished split fits the memory cap; the best of all %d in-order splits is the MIP start", tried)
    warm = start is not None
    if start is not None:
        for (u, c), var in model.x.items():
            var.setInitialValue(1.0 if start[u] == c else 0.0)
        for (u, c), var in model.y.items():
            var.setInitialValue(1.0 if start[u] <= c else 0.0)
        _, start_rank_time, _, start_chunk_time = _evaluate(problem, start)
        model.t.setInitialValue(max(start_rank_time) / model.time_scale)
        if model.tc is not None:
            model.tc.setInitialValue(max(sum(ct.values()) for ct in start_chunk_time) / model.time_scale)

    with tempfile.TemporaryDirectory(prefix="symfold_") as tmp:
        path = lp_path or os.path.join(tmp, "symfold.lp")
        prob.writeLP(path)
        with open(path) as f:
            lp_text = f.read()
        log_path = os.path.join(tmp, "cbc.log")
        log.info(
            "SymFold ILP: %d units, V = K·P = %d·%d = %d chunks, %d variables, %d constraints, "
            "time limit %.3g s, MIP start %s",
            n, problem.chunks, problem.stages, v, num_vars, num_cons, problem.time_limit_s,
            "best of even / cost-quantile split (polished) and any given start" if warm else "none (both splits break the memory cap)",
        )
        t_solve = time.perf_counter()
        # the limit covers the whole call: CBC gets what the MIP start left (at least 10 %)
        cbc_limit = max(problem.time_limit_s - (time.perf_counter() - t0), 0.1 * problem.time_limit_s)
        solver = _solver(problem, cbc_limit, log_path, tmp, warm=warm)
        try:
            status = solve_with_deadline(lambda: prob.solve(solver), tmp, cbc_deadline_s(cbc_limit))
        except pulp.PulpSolverError as exc:  # CBC exited with an error (it rarely crashes on a model)
            solve_s = time.perf_counter() - t_solve
            tail = _file_tail(log_path)
            if start is None:
                raise PartitionError(
                    f"CBC failed after {solve_s:.3g} s on {n} units onto {v} chunks ({exc}) with no MIP start to fall "
                    f"back on. Its log ends: {tail!r}. Try again with another time_limit_s, a larger memory cap, or "
                    "fewer (coarser) units."
                ) from exc
            log.warning("CBC failed after %.3g s (%s; its log ends %r): the MIP start is the answer", solve_s, exc, tail)
            return _answer(problem, list(start), STATUS_SOLVER_FAILED, [_combinatorial_bound(problem)], t0, lp_text, num_vars, num_cons, baseline)
        solve_s = time.perf_counter() - t_solve
        if status is None:  # CBC was stopped: the MIP start is the answer
            if start is None:
                raise PartitionError(
                    f"CBC ran {solve_s:.3g} s (time_limit_s = {problem.time_limit_s:g}) on {n} units onto {v} chunks "
                    "and was stopped before it found a partition. Give it a longer time_limit_s, or use fewer "
                    "(coarser) units."
                )
            return _answer(problem, list(start), STATUS_TIME_LIMIT, [_combinatorial_bound(problem)], t0, lp_text, num_vars, num_cons, baseline)
        try:
            with open(log_path) as f:
                cbc_log = f.read()
        except OSError:
            cbc_log = ""
        status_name = pulp.LpStatus[status]
        sol_status = prob.sol_status
        log.debug("CBC status %s, solution status %s, %.3f s", status_name, sol_status, solve_s)

        if status_name == "Infeasible":
            if problem.memory_cap_bytes is not None:
                raise _memory_error(problem, _memory_lower_bound(problem), proven=True)
            raise PartitionError(f"the SymFold ILP is infeasible for {n} units on {v} chunks (unexpected without a memory cap)")
        if sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            raise PartitionError(
                f"CBC stopped after {solve_s:.3g} s (time_limit_s = {problem.time_limit_s:g}) without a "
                f"feasible partition of {n} units onto {v} chunks (status {status_name}). "
                f"Give it a longer time_limit_s, or use fewer (coarser) units."
            )

        chunk_of_unit = []
        for u in range(n):
            chosen = [c for c in model.windows[u] if (model.x[u, c].value() or 0.0) > 0.5]
            if len(chosen) != 1:
                raise PartitionError(f"CBC returned no unique chunk for unit {u} ({chosen}); solver output is unusable")
            chunk_of_unit.append(chosen[0])
        objective, rank_time, rank_memory, chunk_time = _evaluate(problem, chunk_of_unit)
        if start is not None and sol_status != pulp.LpSolutionOptimal:
            start_objective = _evaluate(problem, start)[0]
            if start_objective < objective:  # CBC dropped the MIP start (it should not)
                log.warning("CBC returned %.6g, worse than its MIP start %.6g; keeping the start", objective, start_objective)
                chunk_of_unit = list(start)
                objective, rank_time, rank_memory, chunk_time = _evaluate(problem, chunk_of_unit)

        candidates = [_combinatorial_bound(problem)]
        if sol_status == pulp.LpSolutionOptimal:
            status_str = STATUS_OPTIMAL
            # proven: nothing better by more than the cutoff increment exists
            candidates.append(objective - MIP_INCREMENT * model.time_scale)
        else:
            status_str = STATUS_TIME_LIMIT
            cbc_bound = _cbc_lower_bound(cbc_log)
            if cbc_bound is not None and cbc_bound * model.time_scale > objective * (1 + 1e-9):
                log.warning("ignoring CBC bound %.6g above its own solution %.6g", cbc_bound * model.time_scale, objective)
                cbc_bound = None
            if cbc_bound is not None:
                candidates.append(cbc_bound * model.time_scale)
            else:
                relax = _relaxation_bound(problem, problem.time_limit_s, tmp)
                if relax is not None:
                    candidates.append(relax)
    return _answer(problem, chunk_of_unit, status_str, candidates, t0, lp_text, num_vars, num_cons, baseline)


def _answer(
    problem: PartitionProblem,
    chunk_of_unit: List[int],
    status_str: str,
    bounds: List[float],
    t0: float,
    lp_text: str,
    num_vars: int,
    num_cons: int,
    baseline: PartitionSolution,
) -> PartitionSolution:
    """The solution for ``chunk_of_unit``, its bound the best of ``bounds`` (lower bounds
    on the objective, none above the answer's own), logged."""
    objective, rank_time, rank_memory, chunk_time = _evaluate(problem, chunk_of_unit)
    bound = min(max(bounds), objective)
    gap = (objective - bound) / objective if objective > 0 else 0.0
    sol = PartitionSolution(
        chunk_of_unit=chunk_of_unit,
        status=status_str,
        objective=objective,
        bound=bound,
        gap=gap,
        rank_time=rank_time,
        rank_memory=rank_memory,
        chunk_time=chunk_time,
        solve_seconds=time.perf_counter() - t0,
        lp_text=lp_text,
        num_variables=num_vars,
        num_constraints=num_cons,
    )
    log.info(
        "SymFold ILP %s in %.3f s: objective %.6g, bound %s, gap %s, max/mean rank time %.4f (even split %.4f)",
        status_str, sol.solve_seconds, objective, f"{bound:.6g}" if bound is not None else "-",
        f"{gap:.3%}" if gap is not None else "-", sol.imbalance, baseline.imbalance,
    )
    return sol
