"""SymFold: partition the joint graph into balanced, folded pipeline chunks.

Pipeline of this pass: units (``passes/units.py``) → per-unit four-phase cost, memory
and boundary bytes from per-node times (``passes/cost.py``) → the ILP
(``passes/symfold_ilp.py``) → split into (chunk, phase) graphs (``passes/split.py``).

Three methods share that machinery so benchmark ratios are honest:

- ``symfold``: the ILP over folded units (every backward node on its forward node's chunk);
- ``even``: the same fold, equal numbers of units per chunk, no solver;
- ``unfolded``: what a 1F1B system does: the chain F_1..F_L, G_L..G_1 cut into P
  contiguous pieces by cost, F+G as the forward task and GG+FB as the backward; a G
  piece away from its F piece receives the activations it needs from another rank.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch.fx as fx

from .cost import graph_costs
from .labels import PHASE, PHASES, compute_nodes
from .replicate import choose_replicated, replicate_on_readers
from .split import FOLDED, UNFOLDED, PhaseLayout, SplitPlan, place_nodes, split_graph
from .symfold_ilp import (
    PartitionError,
    PartitionProblem,
    PartitionSolution,
    Unit,
    UnitEdge,
    even_partition,
    solve_partition,
    wave_rank,
)
from .segments import segment_units
from .units import Units, build_units

log = logging.getLogger(__name__)

METHODS = ("symfold", "even", "unfolded")
UNIT_ORDERS = ("auto", "chain", "dag")
UNITS_PER_CHUNK = 4
BALANCE_TARGET = 1.10  # max/mean rank time under which finer units are not tried
CHUNK_BALANCE_TARGET = 1.25  # K > 1: max/mean chunk time over which heavy units are segmented
MAX_UNIT_DEPTH = 4
Sizes = Mapping[str, int]


@dataclass
class Partition:
    method: str
    stages: int
    chunks: int
    units: Units
    plan: SplitPlan
    problem: PartitionProblem
    node_times: Dict[str, float]
    out_bytes: Dict[str, float]
    param_bytes: Dict[str, float]
    solution: Optional[PartitionSolution] = None
    chunk_of_unit: Optional[List[int]] = None
    replicas: Dict[str, List[int]] = field(default_factory=dict)  # original value -> chunks computing a copy
    # measured seconds of each (chunk, group) graph on the example micro-batch
    # (`passes/group_timing.py`); empty when not measured: the schedule then sums node times
    group_times: Dict[Tuple[int, str], float] = field(default_factory=dict)
    # measured seconds per rank of the split this one replaced (`passes/rebalance.py`), else empty
    rebalanced_from: List[float] = field(default_factory=list)

    @property
    def num_chunks(self) -> int:
        return self.plan.chunks

    def rank_of_chunk(self, chunk: int) -> int:
        return chunk if self.method == "unfolded" else wave_rank(chunk, self.stages)

    def chunk_phase_time(self) -> Dict[Tuple[int, str], float]:
        """Seconds per (chunk, phase) for one micro-batch, phases after legalisation."""
        out: Dict[Tuple[int, str], float] = {}
        pl = self.plan.placement
        for name, c in pl.chunk.items():
            key = (c, pl.phase[name])
            out[key] = out.get(key, 0.0) + self.node_times.get(name, 0.0)
        return out

    def rank_times(self, group_times: Optional[Mapping[Tuple[int, str], float]] = None) -> List[float]:
        """Seconds per rank for one micro-batch: the (chunk, phase) times summed per rank,
        from the node times unless ``group_times`` (e.g. the measured ones) are given."""
        times = [0.0] * self.stages
        for (c, _), t in (self.chunk_phase_time() if group_times is None else group_times).items():
            times[self.rank_of_chunk(c)] += t
        return times

    def imbalance(self, group_times: Optional[Mapping[Tuple[int, str], float]] = None) -> float:
        """max/mean per-rank step time (of `rank_times`): 1.0 is perfect balance."""
        times = self.rank_times(group_times)
        mean = sum(times) / len(times)
        return max(times) / mean if mean > 0 else 1.0

    def rank_memory(self, microbatches_in_flight: int = 1) -> List[Dict[str, float]]:
        """Bytes per rank: parameters (+grads, Adam state) and stash per in-flight micro-batch.

        Stash: every value a rank reads in a later phase group than the one that made it
        (its own activations, or activations received from another rank).
        """
        from .symfold_ilp import OPTIMIZER_COPIES

        plan = self.plan
        producer = {name: key for key, g in plan.groups.items() for name in g.outputs}
        rank_of_group = {key: self.rank_of_chunk(key[0]) for key in plan.groups}
        order = plan.layout.groups
        stash: List[set] = [set() for _ in range(self.stages)]
        params: List[set] = [set() for _ in range(self.stages)]
        for key, g in plan.groups.items():
            r = rank_of_group[key]
            for name in g.inputs:
                if name in self.param_bytes:
                    params[r].add(name)
                src = producer.get(name)
                if src is not None and order.index(src[1]) < order.index(key[1]):
                    stash[r].add(name)
        out = []
        for r in range(self.stages):
            p = sum(self.param_bytes[n] for n in params[r])
            s = sum(self.out_bytes.get(n, 0.0) for n in stash[r])
            out.append({"params": OPTIMIZER_COPIES * p, "stash_per_microbatch": s, "total": OPTIMIZER_COPIES * p + s * microbatches_in_flight})
        return out

    def table(self) -> List[Dict[str, object]]:
        """One row per chunk: rank, units, per-phase seconds, boundary tensors received."""
        cpt = self.chunk_phase_time()
        rows = []
        plan = self.plan
        producer = {name: key for key, g in plan.groups.items() for name in g.outputs}
        nodes = {n.name: n for n in plan_nodes(plan)}
        for c in range(self.num_chunks):
            received = {}
            for key, g in plan.groups.items():
                if key[0] != c:
                    continue
                for name in g.inputs:
                    src = producer.get(name)
                    if src is not None and src[0] != c:
                        node = nodes.get(name)
                        shape = node.meta.get("shape") if node is not None else None
                        received[name] = {"from_chunk": src[0], "phase": src[1], "shape": str(shape), "bytes": self.out_bytes.get(name, 0.0)}
            units = sorted({self.units.names[self.units.unit_of_node[n]] for n, ch in plan.placement.chunk.items() if ch == c and plan.placement.phase[n] == "F" and n in self.units.unit_of_node})
            rows.append(
                {
                    "chunk": c,
                    "rank": self.rank_of_chunk(c),
                    "units": units,
                    "seconds": {p: cpt.get((c, p), 0.0) for p in PHASES},
                    "received": received,
                }
            )
        return rows


def plan_nodes(plan: SplitPlan) -> List[fx.Node]:
    return [n for g in plan.groups.values() for n in g.gm.graph.nodes if n.op == "placeholder"]


def _param_bytes(graph: fx.Graph) -> Dict[str, float]:
    from .cost import nbytes

    out = {}
    for n in graph.nodes:
        if n.op == "placeholder" and n.name.startswith("param_"):
            out[n.name] = float(nbytes(n))
    return out


def build_problem(
    graph: fx.Graph,
    units: Units,
    node_times: Mapping[str, float],
    out_bytes: Mapping[str, float],
    param_bytes: Mapping[str, float],
    stages: int,
    chunks: int,
    not_sent: Optional[set] = None,
    **ilp_options,
) -> PartitionProblem:
    """Per-unit folded costs, memory and boundary bytes: the ILP's input. Values in
    ``not_sent`` (replicated on their readers) cost no transfer."""
    cost = [{p: 0.0 for p in PHASES} for _ in units.names]
    params: List[set] = [set() for _ in units.names]
    stash = [0.0] * len(units.names)
    for n in compute_nodes(graph):
        u = units.unit_of_node.get(n.name)
        if u is None:
            continue
        cost[u][n.meta[PHASE]] += node_times.get(n.name, 0.0)
        for m in n.all_input_nodes:
            if m.name in param_bytes:
                params[u].add(m.name)
        # a forward/force value read by a later phase is stashed per micro-batch
        if n.meta[PHASE] in ("F", "G") and any(user.meta.get(PHASE) in ("GG", "FB") for user in n.users):
            stash[u] += out_bytes.get(n.name, 0.0)
    unit_list = [
        Unit(name, cost[u], sum(param_bytes[p] for p in params[u]), stash[u]) for u, name in enumerate(units.names)
    ]
    skip = not_sent or set()
    edges = [
        UnitEdge(a, b, sum(out_bytes.get(n, 0.0) for n in names if n not in skip)) for (a, b), names in sorted(units.edges.items())
    ]
    return PartitionProblem(unit_list, edges, stages, chunks, **ilp_options)


def _linear_cuts(costs: Sequence[float], pieces: int) -> List[int]:
    """Piece index of each item: contiguous, minimising the largest piece (exact DP)."""
    n = len(costs)
    if pieces > n:
        raise PartitionError(f"{pieces} stages but the unfolded chain has only {n} items: use fewer stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(pieces + 1)]
    cut = [[0] * (n + 1) for _ in range(pieces + 1)]
    best[0][0] = 0.0
    for k in range(1, pieces + 1):
        for i in range(k, n - (pieces - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    piece = [0] * n
    i = n
    for k in range(pieces, 0, -1):
        j = cut[k][i]
        for t in range(j, i):
            piece[t] = k - 1
        i = j
    return piece


def unfolded_chain(units: Units, problem: PartitionProblem) -> Tuple[List[Tuple[str, int]], List[float]]:
    """The unfolded chain F_1..F_L, G_L..G_1 as (half, unit) items, and each item's
    seconds (F+FB for an F item, G+GG for a G item)."""
    L = len(units.names)
    chain = [("F", u) for u in range(L)] + [("G", u) for u in reversed(range(L))]
    cost = []
    for half, u in chain:
        c = problem.units[u].cost
        cost.append(c.get("F", 0) + c.get("FB", 0) if half == "F" else c.get("G", 0) + c.get("GG", 0))
    return chain, cost


def unfolded_stage_of_nodes(graph: fx.Graph, units: Units, chain: Sequence[Tuple[str, int]], piece: Sequence[int]) -> Dict[str, int]:
    """Stage of every unit node when chain item k sits on stage ``piece[k]``."""
    stage_of = {item: piece[k] for k, item in enumerate(chain)}
    override = {}
    for n in compute_nodes(graph):
        u = units.unit_of_node.get(n.name)
        if u is None:
            continue
        half = "F" if n.meta[PHASE] in ("F", "FB") else "G"
        override[n.name] = stage_of[(half, u)]
    return override


def _unfolded_override(graph: fx.Graph, units: Units, problem: PartitionProblem, stages: int) -> Tuple[Dict[str, int], float]:
    """Stage of every node under the unfolded 1F1B partition, and the slowest stage's
    seconds per micro-batch."""
    chain, cost = unfolded_chain(units, problem)
    piece = _linear_cuts(cost, stages)
    stage_time = [0.0] * stages
    for k, c in enumerate(cost):
        stage_time[piece[k]] += c
    return unfolded_stage_of_nodes(graph, units, chain, piece), max(stage_time)


def _busiest_link_seconds(plan: SplitPlan, out_bytes: Mapping[str, float], bandwidth_bytes_per_s: float) -> float:
    """Seconds per micro-batch on the busiest (sending stage, receiving stage) link: each
    value sent once per reading stage. A link is a pipeline stage of its own (the
    simulator serialises messages per channel), so a cut through per-edge tensors can
    make it the slowest one."""
    producer = {name: key for key, g in plan.groups.items() for name in g.outputs}
    sent = set()
    for key, g in plan.groups.items():
        for name in g.inputs:
            src = producer.get(name)
            if src is not None and src[0] != key[0]:
                sent.add((name, src[0], key[0]))
    load: Dict[Tuple[int, int], float] = {}
    for name, a, b in sent:
        load[(a, b)] = load.get((a, b), 0.0) + float(out_bytes.get(name, 0.0))
    return max(load.values(), default=0.0) / bandwidth_bytes_per_s


def _unfolded_split(
    gm: fx.GraphModule, fine: Units, fine_problem: PartitionProblem, node_times: Mapping[str, float],
    out_bytes: Mapping[str, float], param_bytes: Mapping[str, float], stages: int, ilp_options: Mapping[str, object],
) -> Tuple[Units, PartitionProblem, SplitPlan]:
    """1F1B's baseline: the chain cut by the DP on the coarsest units that give P items,
    on the fine units SymFold starts from, and, where those miss the balance target (a
    unit heavier than a stage's share: the geometry prologue at ~1000 atoms), on heavy
    units cut into segments, as SymFold does. Finer cuts balance compute but may cut
    through per-edge tensors, so the split kept is the one whose slowest stage or link
    (a link is a stage of its own: the simulator serialises messages per channel) is
    fastest; the coarse one on a tie."""
    graph = gm.graph
    coarse = build_units(graph, min_units=max(1, (stages + 1) // 2))
    finest = fine if fine.names != coarse.names else coarse  # the same units at few blocks or many stages
    candidates = [coarse] + ([fine] if finest is fine else [])
    best = None
    errors: List[PartitionError] = []
    while candidates:
        units = candidates.pop(0)
        same_as_fine = units.names == fine.names  # its problem is the caller's
        problem = fine_problem if same_as_fine else build_problem(graph, units, node_times, out_bytes, param_bytes, stages, 1, **ilp_options)
        mean = sum(u.total_cost() for u in problem.units) / stages
        try:
            override, slowest = _unfolded_override(graph, units, problem, stages)
        except PartitionError as exc:  # fewer chain items than stages: a finer set may have enough
            errors.append(exc)
            slowest = float("inf")
        else:
            plan = split_graph(gm, units, [0] * len(units.names), stages, UNFOLDED, chunk_override=override)
            score = max(slowest, _busiest_link_seconds(plan, out_bytes, problem.bandwidth_bytes_per_s))
            log.info("unfolded on %d units: max/mean stage %.3f, slowest stage or link %.4g s", len(units.names), slowest / (mean or 1.0), score)
            if best is None or score < best[0]:
                best = (score, units, problem, plan)
        # the finest set is cut into segments when its chain misses the balance target
        if units is finest:
            if mean > 0 and slowest / mean > BALANCE_TARGET:
                cut = segment_units(graph, units, node_times, out_bytes, mean)
                if len(cut.names) > len(units.names):
                    candidates.append(cut)
    if best is None:
        raise errors[-1]
    return best[1], best[2], best[3]


def folded_plan(
    gm: fx.GraphModule,
    units: Units,
    chunk_of_unit: Sequence[int],
    chunks: int,
    replicated: Set[str],
    node_times: Mapping[str, float],
    out_bytes: Mapping[str, float],
    build_modules: bool = True,
) -> Tuple[SplitPlan, Dict[str, float], Dict[str, float], Dict[str, List[int]]]:
    """The folded split of ``gm`` for a unit -> chunk assignment, ``replicated`` values
    computed again on every chunk that reads them (`passes/replicate.py`). Returns the
    plan, the node times and output sizes with the copies priced as their originals, and
    original -> chunks holding a copy. ``build_modules=False``: a plan to simulate only."""
    node_times, out_bytes = dict(node_times), dict(out_bytes)
    replicas: Dict[str, List[int]] = {}
    pinned = None
    if replicated and chunks > 1:
        chunk_of = place_nodes(gm.graph, units, chunk_of_unit, FOLDED).chunk
        gm, pinned, original = replicate_on_readers(gm, replicated, chunk_of)
        node_times.update({c: node_times.get(o, 0.0) for c, o in original.items()})
        out_bytes.update({c: out_bytes.get(o, 0.0) for c, o in original.items()})
        for copy, orig in original.items():
            replicas.setdefault(orig, []).append(pinned[copy])
    plan = split_graph(gm, units, chunk_of_unit, chunks, FOLDED, chunk_override=pinned, build_modules=build_modules)
    return plan, node_times, out_bytes, replicas


def partition_graph(
    gm: fx.GraphModule,
    stages: int,
    chunks: int = 1,
    method: str = "symfold",
    node_times: Optional[Mapping[str, float]] = None,
    sizes: Optional[Sizes] = None,
    lp_path: Optional[str] = None,
    replicate: str = "auto",
    order: str = "auto",
    search_cuts: bool = True,
    **ilp_options,
) -> Partition:
    """Cut a joint graph into ``stages × chunks`` chunks by ``method`` and split it.

    ``node_times`` are seconds per node for one micro-batch (from a calibrated
    `CostModel`); without them, FLOPs + bytes at ``sizes`` stand in (uncalibrated).
    ``replicate`` (folded methods): recompute data-only forward values such as geometry on
    the chunks that read them instead of sending them (`passes/replicate.py`): ``auto``
    where that is cheaper than the transfer, ``always``, or ``never``.
    ``order`` (``symfold``): ``chain`` keeps chunks contiguous runs of the topological unit
    order, ``dag`` lets any unit sit on any chunk its data flow allows, ``auto`` solves
    the chain and relaxes it to the data flow only when the balance target is missed.
    ``search_cuts`` (``unfolded``): move the DP's cuts to where 1F1B's simulated step is
    shortest, within `unfolded_cuts.BUDGET_ILP_LIMITS` ILP time limits
    (`passes/unfolded_cuts.py`); False keeps them.
    """
    if order not in UNIT_ORDERS:
        raise PartitionError(f"unknown unit order {order!r}; choose one of {UNIT_ORDERS}")
    if method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; choose one of {METHODS}")
    if method == "unfolded" and chunks != 1:
        raise PartitionError("the unfolded (1F1B) baseline has one chunk per stage: use chunks=1")
    V = stages * chunks
    graph = gm.graph
    sizes = dict(sizes or {"atoms": 1000, "edges": 30000, "structures": 10})
    costs = graph_costs(graph)
    evaluated = {name: c.evaluate(sizes) for name, c in costs.items()}
    out_bytes = {name: v[2] for name, v in evaluated.items()}
    if node_times is None:
        node_times = {name: v[0] * 1e-10 + v[1] * 1e-10 + 2e-6 for name, v in evaluated.items()}
    param_bytes = _param_bytes(graph)
    # Finer units balance better; ask for a few per chunk (coarser if the model has no more).
    # The unfolded baseline also tries coarser ones (`_unfolded_split`).
    units = build_units(graph, min_units=UNITS_PER_CHUNK * V)
    if method != "unfolded" and len(units.names) < V:
        raise PartitionError(
            f"{V} chunks (stages={stages} × chunks={chunks}) but the model has only "
            f"{len(units.names)} units even at module depth {units.depth}: use fewer stages or "
            "chunks, or a model with more layers"
        )
    replicated: set = set()
    if method != "unfolded":
        bandwidth = ilp_options.get("bandwidth_bytes_per_s", PartitionProblem.bandwidth_bytes_per_s)
        replicated = choose_replicated(graph, node_times, out_bytes, bandwidth, replicate)
    if method == "symfold":
        ilp_options["order"] = "dag" if order == "dag" else "chain"
    problem = build_problem(
        graph, units, node_times, out_bytes, param_bytes, stages, chunks if method != "unfolded" else 1, not_sent=replicated, **ilp_options
    )
    solution = None
    chunk_of_unit: Optional[List[int]] = None
    if method == "symfold":
        solution = solve_partition(problem, lp_path=lp_path)
        # Coarse units can make balance impossible (one block per rank is too much or too
        # little): try finer units while that helps, keep the best objective.
        depth = units.depth
        while solution.imbalance > BALANCE_TARGET and depth < MAX_UNIT_DEPTH:
            depth += 1
            finer = build_units(graph, min_units=1, min_depth=depth, max_depth=depth)
            if len(finer.names) <= len(units.names):
                continue
            finer_problem = build_problem(graph, finer, node_times, out_bytes, param_bytes, stages, chunks, not_sent=replicated, **ilp_options)
            candidate = solve_partition(finer_problem, lp_path=lp_path)
            log.info("units at depth %d: %d units, max/mean %.3f (was %.3f)", depth, len(finer.names), candidate.imbalance, solution.imbalance)
            if candidate.objective < solution.objective:
                units, problem, solution = finer, finer_problem, candidate
        # Still unbalanced: a single unit outweighs a chunk's share. Cut heavy units into
        # fold-safe segments of their own code (passes/segments.py). With K > 1 chunks per
        # rank, ranks can balance while their chunks do not (one heavy, one nearly empty:
        # a K = 1 pipeline with extra hops), which segments fix too.
        if solution.imbalance > BALANCE_TARGET or (chunks > 1 and solution.chunk_imbalance() > CHUNK_BALANCE_TARGET):
            share = sum(u.total_cost() for u in problem.units) / V
            cut = segment_units(graph, units, node_times, out_bytes, share)
            if len(cut.names) > len(units.names):
                cut_problem = build_problem(graph, cut, node_times, out_bytes, param_bytes, stages, chunks, not_sent=replicated, **ilp_options)
                candidate = solve_partition(cut_problem, lp_path=lp_path)
                log.info(
                    "segmented units: %d units, max/mean rank %.3f, chunk %.3f (was %.3f, %.3f)",
                    len(cut.names), candidate.imbalance, candidate.chunk_imbalance(), solution.imbalance, solution.chunk_imbalance(),
                )
                if candidate.objective < solution.objective:
                    units, problem, solution = cut, cut_problem, candidate
        # Still unbalanced: chunks as contiguous runs of one topological order can miss the
        # even point by a whole heavy node. Units only later readers depend on (geometry-only
        # filters) may sit on any earlier chunk: relax the chain to the data flow.
        if solution.imbalance > BALANCE_TARGET and order == "auto":
            # warm-started from the chain's answer, so a short search can only improve it
            dag_problem = dataclasses.replace(problem, order="dag", time_limit_s=max(1.0, problem.time_limit_s / 3))
            candidate = solve_partition(dag_problem, lp_path=lp_path, initial=solution.chunk_of_unit)
            log.info("data-flow order: max/mean rank %.3f (chain %.3f)", candidate.imbalance, solution.imbalance)
            if candidate.objective < solution.objective:
                problem, solution = dag_problem, candidate
        # Still unbalanced: the default charge (a transfer per chunk an edge crosses) makes
        # far-reaching skips look dear and can buy short ones with balance. Charged once,
        # as the runtime sends them, the same units may balance; keep that if it does
        # (unless the caller chose the charge).
        if solution.imbalance > BALANCE_TARGET and "transfer_charge" not in ilp_options:
            once_problem = dataclasses.replace(problem, transfer_charge="once")
            candidate = solve_partition(once_problem, lp_path=lp_path, initial=solution.chunk_of_unit)
            log.info("transfers charged once: max/mean rank %.3f (per chunk %.3f)", candidate.imbalance, solution.imbalance)
            if candidate.imbalance < solution.imbalance:
                problem, solution = once_problem, candidate
        chunk_of_unit = solution.chunk_of_unit
    elif method == "even":
        solution = even_partition(problem)
        chunk_of_unit = solution.chunk_of_unit
    replicas: Dict[str, List[int]] = {}
    if method != "unfolded":
        plan, node_times, out_bytes, replicas = folded_plan(gm, units, chunk_of_unit, V, replicated, node_times, out_bytes)
    else:
        units, problem, plan = _unfolded_split(gm, units, problem, node_times, out_bytes, param_bytes, stages, ilp_options)
    part = Partition(
        method, stages, chunks if method != "unfolded" else 1, units, plan, problem, dict(node_times), out_bytes, param_bytes,
        solution, chunk_of_unit, replicas,
    )
    if method == "unfolded" and search_cuts:
        from .unfolded_cuts import refine_unfolded_cuts

        part = refine_unfolded_cuts(gm, part, problem.time_limit_s)
    log.info("%s partition: P=%d K=%d, max/mean rank time %.3f", method, stages, part.chunks, part.imbalance())
    return part
