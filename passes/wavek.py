"""WaveK and the baseline pipeline schedules, lowered to per-rank programs.

A training step is a DAG of tasks ``(chunk, phase group, micro-batch)``: every
(chunk, phase) group of the split runs once per micro-batch and reads what the groups in
`PipelineDAG.deps` produced for the same micro-batch. A schedule is an order of tasks per
rank; `build_programs` turns it into explicit `Compute`/`Send`/`Recv` actions
(``runtime/program.py``), `validate` proves the programs cannot deadlock and run every
task exactly once, and `simulate` times them with the calibrated costs.

Schedules (`SCHEDULES`):

- ``gpipe``: every forward-half task (F, G / FWD) of every micro-batch, then every
  backward-half task (GG, FB / BWD), each half in (group, micro-batch) order;
- ``1f1b``: the unfolded layout, classic one-forward-one-backward;
- ``hanayo``: the phase-agnostic wave baseline (see `hanayo`);
- ``wavek``: ours: list scheduling on the real DAG with the real per-phase costs, the
  best of a few priority rules and in-flight caps (see `wavek`).

Everything here is deterministic (no randomness, total tie-breaks), so a program set
is reproducible from the partition and the options alone.
"""
from __future__ import annotations

import heapq
import logging
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

from janus_compile.runtime.program import Compute, GradSync, OptimizerStep, ProgramSet, RankProgram, Recv, Send

from .copy_cost import CopyCost, CopyModel, MeasuredCopyCost, copy_cost_from_json
from .symfold_ilp import wave_rank

log = logging.getLogger(__name__)

GroupKey = Tuple[int, str]
Edge = Tuple[GroupKey, GroupKey]


class Task(NamedTuple):
    chunk: int
    phase: str
    mb: int

    @property
    def group(self) -> GroupKey:
        return (self.chunk, self.phase)


class ScheduleError(Exception):
    """A schedule or program set that cannot run: deadlock, missing or duplicated task."""


PHASE_POS = {"F": 0, "G": 1, "GG": 2, "FB": 3, "FWD": 0, "BWD": 1}
FORWARD_LIKE = frozenset({"F", "G", "FWD"})
UPWARD = frozenset({"F", "GG", "FWD"})
PHASE_COLORS = {"F": "#8ecae6", "G": "#ffb703", "GG": "#fb8500", "FB": "#219ebc", "FWD": "#90be6d", "BWD": "#b5838d"}
COPY_COLOR = "#555555"  # Gantt: CPU time a message costs a rank
MLIP_COSTS = {"F": 1.0, "G": 1.7, "GG": 2.5, "FB": 2.2}
DEFAULT_BANDWIDTH = 25e9  # bytes/s between two ranks (NVLink-class); override per cluster
DEFAULT_LATENCY = 20e-6  # seconds per message


# ---------------------------------------------------------------------------------------
# The DAG
# ---------------------------------------------------------------------------------------


def _copy_cost_of_meta(meta: Mapping[str, Any]) -> CopyModel:
    """The copy cost of a `PipelineDAG.describe` (programs stored before the measured model
    carry three linear terms instead)."""
    if "copy_cost" in meta:
        return copy_cost_from_json(meta["copy_cost"])
    return CopyCost(meta.get("copy_s_per_message", 0.0), meta.get("copy_s_per_tensor", 0.0), meta.get("copy_s_per_byte", 0.0))


@dataclass
class PipelineDAG:
    """The (chunk, phase group) dependency DAG, its placement and costs, for M micro-batches.

    ``cost`` is seconds per micro-batch of each group; ``deps[g]`` the groups whose outputs
    ``g`` reads (same micro-batch); ``tensors[(producer, consumer)]`` the value names that
    flow along an edge and ``nbytes`` their sizes (transfer time = latency + bytes /
    bandwidth when the two groups sit on different ranks). Edges without ``tensors`` get
    one zero-byte name per producer. ``copy_cost`` (`passes.copy_cost`): the compute time
    a CPU rank loses to each message (a Send or Recv of one or more tensors) it sends or
    receives (gloo copies through loopback TCP on the ranks' own cores;
    `runtime.copy_probe` measures it), charged to the sender right after the send and to
    the receiver on the receive; free on GPUs. The two copies of one message overlap in
    time (the receiver reads the socket while the sender writes it; `simulate`), so a
    waiting receiver pays one copy on its critical path, not two.
    """

    stages: int
    microbatches: int
    rank_of_chunk: Dict[int, int]
    cost: Dict[GroupKey, float]
    deps: Dict[GroupKey, List[GroupKey]] = field(default_factory=dict)
    tensors: Dict[Edge, Tuple[str, ...]] = field(default_factory=dict)
    nbytes: Dict[str, float] = field(default_factory=dict)
    layout: str = "folded"
    bandwidth_bytes_per_s: float = math.inf
    latency_s: float = 0.0
    copy_cost: CopyModel = CopyCost()

    def __post_init__(self) -> None:
        if not isinstance(self.copy_cost, (CopyCost, MeasuredCopyCost)):
            raise ValueError(f"copy_cost must be a CopyCost or MeasuredCopyCost, got {self.copy_cost!r}")
        if self.stages < 1 or self.microbatches < 1:
            raise ValueError(f"need stages >= 1 and microbatches >= 1, got {self.stages}, {self.microbatches}")
        if self.layout not in ("folded", "unfolded"):
            raise ValueError(f"layout must be 'folded' or 'unfolded', got {self.layout!r}")
        self.cost = {(int(c), str(p)): float(t) for (c, p), t in self.cost.items()}
        self.nbytes = dict(self.nbytes)
        self.rank_of_chunk = {int(c): int(r) for c, r in self.rank_of_chunk.items()}
        deps = {g: [] for g in self.cost}
        for g, ds in self.deps.items():
            g = (int(g[0]), str(g[1]))
            if g not in self.cost:
                raise ValueError(f"group {g} has dependencies but no cost")
            for d in ds:
                d = (int(d[0]), str(d[1]))
                if d not in self.cost:
                    raise ValueError(f"group {g} depends on unknown group {d}")
                if d != g and d not in deps[g]:
                    deps[g].append(d)
        self.deps = {g: sorted(ds, key=self._group_sort_key) for g, ds in deps.items()}
        for g in self.cost:
            if g[1] not in PHASE_POS:
                raise ValueError(f"group {g}: unknown phase {g[1]!r}; known {sorted(PHASE_POS)}")
            if g[0] not in self.rank_of_chunk:
                raise ValueError(f"group {g}: chunk {g[0]} has no rank")
            r = self.rank_of_chunk[g[0]]
            if not 0 <= r < self.stages:
                raise ValueError(f"chunk {g[0]} on rank {r}, outside 0..{self.stages - 1}")
        tensors: Dict[Edge, Tuple[str, ...]] = {}
        for g, ds in self.deps.items():
            for d in ds:
                names = tuple(self.tensors.get((d, g), ())) or (f"{d[1].lower()}{d[0]}_out",)
                tensors[(d, g)] = names
                for n in names:
                    self.nbytes.setdefault(n, 0.0)
        self.tensors = tensors
        self.groups: List[GroupKey] = self._topological_order()
        self.succs: Dict[GroupKey, List[GroupKey]] = {g: [] for g in self.groups}
        for g in self.groups:
            for d in self.deps[g]:
                self.succs[d].append(g)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_partition(
        cls,
        partition: Any,
        microbatches: int,
        bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH,
        latency_s: float = DEFAULT_LATENCY,
        copy_cost: CopyModel = CopyCost(),
    ) -> "PipelineDAG":
        """The DAG of a real `Partition`: its groups, data-flow dependencies and times.

        A group costs its measured time (``partition.group_times``) where every group was
        timed, else the sum of its nodes' calibrated times. An edge carries the consumer
        group's inputs that the producer group outputs, sized by ``partition.out_bytes``.
        """
        plan = partition.plan
        layout = "unfolded" if list(plan.layout.groups) == ["FWD", "BWD"] else "folded"
        measured = partition.group_times
        if set(plan.groups) <= set(measured):
            cost = {key: float(measured[key]) for key in plan.groups}
        else:
            cost = {key: 0.0 for key in plan.groups}
            for (c, p), t in partition.chunk_phase_time().items():
                key = (c, plan.layout.group(p))
                cost[key] = cost.get(key, 0.0) + t
        deps = plan.group_dependencies()
        tensors: Dict[Edge, Tuple[str, ...]] = {}
        nbytes: Dict[str, float] = {}
        for cons, ds in deps.items():
            for prod in ds:
                outs = set(plan.groups[prod].outputs)
                names = tuple(n for n in plan.groups[cons].inputs if n in outs)
                tensors[(prod, cons)] = names
                for n in names:
                    nbytes[n] = float(partition.out_bytes.get(n, 0.0))
        chunks = sorted({c for c, _ in cost})
        return cls(
            stages=partition.stages,
            microbatches=microbatches,
            rank_of_chunk={c: partition.rank_of_chunk(c) for c in chunks},
            cost=cost,
            deps=deps,
            tensors=tensors,
            nbytes=nbytes,
            layout=layout,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
            latency_s=latency_s,
            copy_cost=copy_cost,
        )

    @classmethod
    def synthetic(
        cls,
        stages: int,
        chunks: int = 1,
        microbatches: int = 1,
        phase_cost: Optional[Mapping[str, float]] = None,
        layout: str = "folded",
        boundary_bytes: float = 0.0,
        stash_bytes: float = 0.0,
        bandwidth_bytes_per_s: float = math.inf,
        latency_s: float = 0.0,
    ) -> "PipelineDAG":
        """A chain model without a real graph (tests, P=32 studies).

        ``chunks`` is K, chunks per rank (wave placement, V = K·P chunks). ``phase_cost``
        is the cost of each phase for one rank's share of the model, so a chunk costs
        ``phase_cost[p] / K`` and the total work does not depend on K or the layout.

        folded: F flows up chunks 0→V-1, G down from the top after the last F, GG up from
        chunk 0 after G, FB down from the top after GG; every later phase of a chunk also
        reads the stash of its earlier phases. unfolded (K must be 1): FWD = F+G up,
        BWD = GG+FB down, BWD reading its own FWD's stash: the 1F1B chain with the same
        work per chunk. Cross-chunk edges carry ``boundary_bytes``, same-chunk edges
        ``stash_bytes``.
        """
        pc = dict(MLIP_COSTS if phase_cost is None else phase_cost)
        P, K = stages, chunks
        cost: Dict[GroupKey, float] = {}
        deps: Dict[GroupKey, List[GroupKey]] = {}
        tensors: Dict[Edge, Tuple[str, ...]] = {}
        nbytes: Dict[str, float] = {}

        def edge(prod: GroupKey, cons: GroupKey) -> None:
            kind = "stash" if prod[0] == cons[0] else "out"
            name = f"{prod[1].lower()}{prod[0]}_{kind}"
            deps.setdefault(cons, []).append(prod)
            tensors[(prod, cons)] = (name,)
            nbytes[name] = stash_bytes if kind == "stash" else boundary_bytes

        if layout == "folded":
            V = P * K
            rank_of_chunk = {c: wave_rank(c, P) for c in range(V)}
            for c in range(V):
                for p in ("F", "G", "GG", "FB"):
                    cost[(c, p)] = pc.get(p, 0.0) / K
                    deps.setdefault((c, p), [])
            for c in range(V):
                if c > 0:
                    edge((c - 1, "F"), (c, "F"))
                    edge((c - 1, "GG"), (c, "GG"))
                if c < V - 1:
                    edge((c + 1, "G"), (c, "G"))
                    edge((c + 1, "FB"), (c, "FB"))
                edge((c, "F"), (c, "G"))
                edge((c, "F"), (c, "GG"))
                edge((c, "G"), (c, "GG"))
                for p in ("F", "G", "GG"):
                    edge((c, p), (c, "FB"))
        elif layout == "unfolded":
            if K != 1:
                raise ValueError("the unfolded (1F1B) layout has one chunk per stage: use chunks=1")
            rank_of_chunk = {c: c for c in range(P)}
            for c in range(P):
                cost[(c, "FWD")] = pc.get("F", 0.0) + pc.get("G", 0.0)
                cost[(c, "BWD")] = pc.get("GG", 0.0) + pc.get("FB", 0.0)
                deps.setdefault((c, "FWD"), [])
                if c > 0:
                    edge((c - 1, "FWD"), (c, "FWD"))
                if c < P - 1:
                    edge((c + 1, "BWD"), (c, "BWD"))
                edge((c, "FWD"), (c, "BWD"))
        else:
            raise ValueError(f"layout must be 'folded' or 'unfolded', got {layout!r}")
        return cls(P, microbatches, rank_of_chunk, cost, deps, tensors, nbytes, layout, bandwidth_bytes_per_s, latency_s)

    # -- queries ------------------------------------------------------------------------

    @staticmethod
    def _group_sort_key(g: GroupKey) -> Tuple[int, int]:
        return (PHASE_POS[g[1]], g[0] if g[1] in UPWARD else -g[0])

    def _topological_order(self) -> List[GroupKey]:
        """Kahn's order, ties broken by phase then chunk in the phase's direction."""
        indeg = {g: len(ds) for g, ds in self.deps.items()}
        succs: Dict[GroupKey, List[GroupKey]] = defaultdict(list)
        for g, ds in self.deps.items():
            for d in ds:
                succs[d].append(g)
        heap = [(self._group_sort_key(g), g) for g, n in indeg.items() if n == 0]
        heapq.heapify(heap)
        order = []
        while heap:
            _, g = heapq.heappop(heap)
            order.append(g)
            for s in succs[g]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    heapq.heappush(heap, (self._group_sort_key(s), s))
        if len(order) != len(indeg):
            stuck = sorted(g for g, n in indeg.items() if n > 0)
            raise ScheduleError(f"the group dependencies have a cycle through {stuck[:6]}")
        return order

    @property
    def num_chunks(self) -> int:
        return len(self.rank_of_chunk)

    @property
    def chunks_per_rank(self) -> int:
        return max(1, self.num_chunks // self.stages)

    def rank(self, group: GroupKey) -> int:
        return self.rank_of_chunk[group[0]]

    def groups_on(self, rank: int) -> List[GroupKey]:
        return [g for g in self.groups if self.rank(g) == rank]

    def edge_bytes(self, prod: GroupKey, cons: GroupKey) -> float:
        return sum(self.nbytes.get(n, 0.0) for n in self.tensors.get((prod, cons), ()))

    def transfer_time(self, nbytes: float) -> float:
        return self.latency_s + (nbytes / self.bandwidth_bytes_per_s if nbytes else 0.0)

    def copy_time(self, names: Sequence[str]) -> float:
        """CPU time a rank loses sending (or receiving) these values as one message."""
        if not names or self.copy_cost.free:
            return 0.0
        return self.copy_cost.of(len(names), sum(self.nbytes.get(n, 0.0) for n in names))

    def comm_time(self, prod: GroupKey, cons: GroupKey) -> float:
        if self.rank(prod) == self.rank(cons):
            return 0.0
        return self.transfer_time(self.edge_bytes(prod, cons))

    def total_work(self) -> float:
        return self.microbatches * sum(self.cost.values())

    def reversed(self) -> "PipelineDAG":
        """The same groups, costs, ranks and links with every edge turned round: scheduling
        it from the start is scheduling this DAG from its end (`forward_backward`)."""
        deps = {g: list(self.succs[g]) for g in self.groups}
        tensors = {(s, g): self.tensors[(g, s)] for g in self.groups for s in self.succs[g]}
        return PipelineDAG(
            self.stages, self.microbatches, self.rank_of_chunk, self.cost, deps, tensors, self.nbytes, self.layout,
            self.bandwidth_bytes_per_s, self.latency_s, self.copy_cost,
        )

    def tasks(self) -> List[Task]:
        return [Task(c, p, m) for m in range(self.microbatches) for (c, p) in self.groups]

    def describe(self) -> Dict[str, Any]:
        """JSON-native description (stored in a `ProgramSet`'s meta, read by `validate`)."""
        return {
            "stages": self.stages,
            "microbatches": self.microbatches,
            "layout": self.layout,
            "chunks_per_rank": self.chunks_per_rank,
            "rank_of_chunk": [[c, r] for c, r in sorted(self.rank_of_chunk.items())],
            "cost_s": [[c, p, self.cost[(c, p)]] for c, p in self.groups],
            "deps": [[[c, p], [[dc, dp] for dc, dp in self.deps[(c, p)]]] for c, p in self.groups],
            "edges": [[[a[0], a[1]], [b[0], b[1]], list(names)] for (a, b), names in self.tensors.items()],
            "bandwidth_bytes_per_s": None if math.isinf(self.bandwidth_bytes_per_s) else self.bandwidth_bytes_per_s,
            "latency_s": self.latency_s,
            "copy_cost": self.copy_cost.to_json(),
        }

    @classmethod
    def from_description(cls, meta: Mapping[str, Any]) -> "PipelineDAG":
        """Rebuild the DAG (without tensor sizes) from `describe` output."""
        try:
            return cls(
                stages=meta["stages"],
                microbatches=meta["microbatches"],
                rank_of_chunk={c: r for c, r in meta["rank_of_chunk"]},
                cost={(c, p): t for c, p, t in meta["cost_s"]},
                deps={(g[0], g[1]): [(d[0], d[1]) for d in ds] for g, ds in meta["deps"]},
                tensors={((a[0], a[1]), (b[0], b[1])): tuple(n) for a, b, n in meta.get("edges", [])},
                layout=meta.get("layout", "folded"),
                bandwidth_bytes_per_s=meta.get("bandwidth_bytes_per_s") or math.inf,
                latency_s=meta.get("latency_s", 0.0),
                copy_cost=_copy_cost_of_meta(meta),
            )
        except KeyError as e:
            raise ScheduleError(f"program meta has no {e.args[0]!r}: pass the PipelineDAG to validate") from None


# ---------------------------------------------------------------------------------------
# Schedules: per-rank task orders
# ---------------------------------------------------------------------------------------

Orders = Dict[int, List[Task]]


def gpipe(dag: PipelineDAG) -> Orders:
    """All forward-half tasks of all micro-batches, then all backward-half tasks.

    Within a half a rank runs its groups in topological order, each for micro-batches
    0..M-1; the key (half, group, micro-batch) is monotone along every edge, so each rank's
    list is a sub-sequence of one global topological order and cannot deadlock.
    """
    pos = {g: i for i, g in enumerate(dag.groups)}
    orders: Orders = {}
    for r in range(dag.stages):
        tasks = [Task(c, p, m) for (c, p) in dag.groups_on(r) for m in range(dag.microbatches)]
        tasks.sort(key=lambda t: (t.phase not in FORWARD_LIKE, pos[t.group], t.mb))
        orders[r] = tasks
    return orders


def one_f_one_b(dag: PipelineDAG) -> Orders:
    """Classic 1F1B on the unfolded layout: P-1-r warm-up forwards, then one forward one
    backward, then the cool-down backwards. "Forward" is a rank's FWD (F+G) groups for a
    micro-batch, "backward" its BWD (GG+FB) groups."""
    if dag.layout != "unfolded":
        raise ScheduleError("1f1b schedules the unfolded layout (FWD/BWD); use gpipe, hanayo or wavek on a folded DAG")
    P, M = dag.stages, dag.microbatches
    orders: Orders = {}
    for r in range(P):
        fwd = [g for g in dag.groups_on(r) if g[1] in FORWARD_LIKE]
        bwd = [g for g in dag.groups_on(r) if g[1] not in FORWARD_LIKE]

        def f(m: int) -> List[Task]:
            return [Task(c, p, m) for c, p in fwd]

        def b(m: int) -> List[Task]:
            return [Task(c, p, m) for c, p in bwd]

        warmup = min(P - 1 - r, M)
        order = [t for m in range(warmup) for t in f(m)]
        nf, nb = warmup, 0
        while nf < M:
            order += f(nf) + b(nb)
            nf, nb = nf + 1, nb + 1
        while nb < M:
            order += b(nb)
            nb += 1
        orders[r] = order
    return orders


def _tails(dag: PipelineDAG, cost: Mapping[GroupKey, float]) -> Dict[GroupKey, float]:
    """Longest remaining path (compute + transfers) from the start of each group to the end."""
    tail: Dict[GroupKey, float] = {}
    for g in reversed(dag.groups):
        tail[g] = cost[g] + max((dag.comm_time(g, s) + tail[s] for s in dag.succs[g]), default=0.0)
    return tail


def _heads(dag: PipelineDAG) -> Dict[GroupKey, float]:
    """Earliest start of each group for one micro-batch: the longest path (compute +
    transfers) from the step's start to it."""
    head: Dict[GroupKey, float] = {}
    for g in dag.groups:
        head[g] = max((head[d] + dag.cost[d] + dag.comm_time(d, g) for d in dag.deps[g]), default=0.0)
    return head


def makespan_lower_bound(dag: PipelineDAG) -> float:
    """No schedule of ``dag`` finishes sooner. For any set S of a rank's groups, the rank
    runs S's tasks of all M micro-batches one after another; none can start before the
    earliest of them could (heads: the fill), and after the last one ends the rest of its
    micro-batch's path still runs (the path after a group ends: the drain). The best S
    for a pair (the group with the smallest head, the one with the shortest path after
    it) holds every group whose head and path after are at least theirs, so pairs
    suffice. One micro-batch's own critical path bounds it too. Messages' CPU cost is
    left out, which keeps the bound valid (`efficiency_bound` turns it into an
    efficiency)."""
    head, tail = _heads(dag), _tails(dag, dag.cost)
    after = {g: tail[g] - dag.cost[g] for g in dag.groups}
    M = dag.microbatches
    best = max(tail.values(), default=0.0)
    for r in range(dag.stages):
        on = dag.groups_on(r)
        for a in on:
            for b in on:
                S = [g for g in on if head[g] >= head[a] and after[g] >= after[b]]
                if S:  # an empty S bounds nothing
                    best = max(best, head[a] + M * sum(dag.cost[g] for g in S) + after[b])
    return best


PriorityFn = Callable[[int, int], Tuple]
RULES = ("deadline:0.2", "deadline:0.35", "deadline:0.5", "deadline:1", "critical_path", "backward_first")


def _priority(rule: str, dag: PipelineDAG, cost: Mapping[GroupKey, float]) -> PriorityFn:
    """Key of task (group index, micro-batch): the smallest key runs first.

    - ``deadline:α``: earliest due date in a periodic schedule that admits a micro-batch
      every α·T, T the busiest rank's work per micro-batch: due(g, m) = α·m·T − tail(g),
      tail(g) the longest remaining path after g starts. The period and the tails come
      from the real per-phase costs, which is how the rule balances the four phases;
      small α favours the critical path, large α finishing old micro-batches;
    - ``critical_path``: longest remaining path first, then oldest micro-batch;
    - ``oldest_first``: oldest micro-batch first (depth-first), then longest path;
    - ``backward_first``: backward-half tasks first (drain, as 1F1B), then oldest
      micro-batch, then the task furthest along.
    """
    groups = dag.groups
    tail = _tails(dag, cost)
    t = [tail[g] for g in groups]
    fwd = [g[1] in FORWARD_LIKE for g in groups]
    if rule == "deadline" or rule.startswith("deadline:"):
        alpha = float(rule.split(":", 1)[1]) if ":" in rule else 1.0
        per_rank: Dict[int, float] = defaultdict(float)
        for g in groups:
            per_rank[dag.rank(g)] += cost[g]
        step = alpha * max(per_rank.values(), default=0.0)
        return lambda i, m: (m * step - t[i], m, i)
    if rule == "critical_path":
        return lambda i, m: (-t[i], m, i)
    if rule == "oldest_first":
        return lambda i, m: (m, -t[i], i)
    if rule == "backward_first":
        return lambda i, m: (fwd[i], m, -i)
    raise ValueError(f"unknown priority rule {rule!r}; known: deadline:<alpha>, critical_path, oldest_first, backward_first")


def in_flight(orders: Orders) -> Dict[int, int]:
    """Peak micro-batches in flight per rank, which an order alone fixes: a micro-batch is
    in flight on a rank from its first task there to its last."""
    out = {}
    for r, order in orders.items():
        first: Dict[int, int] = {}
        last: Dict[int, int] = {}
        for k, t in enumerate(order):
            first.setdefault(t.mb, k)
            last[t.mb] = k
        events = sorted([(k, 1) for k in first.values()] + [(k, -1) for k in last.values()], key=lambda e: (e[0], -e[1]))
        level = peak = 0
        for _, d in events:
            level += d
            peak = max(peak, level)
        out[r] = peak
    return out


Cap = Union[int, Sequence[int]]


def _rank_caps(cap: Cap, stages: int) -> List[int]:
    """An in-flight cap as one number per rank (an int applies to every rank)."""
    caps = [int(cap)] * stages if isinstance(cap, int) else [int(c) for c in cap]
    if len(caps) != stages or min(caps) < 1:
        raise ValueError(f"in-flight cap must be >= 1 on each of the {stages} ranks, got {cap}")
    return caps


def cap_label(cap: Cap) -> Union[int, List[int]]:
    """JSON form of a cap: one number when every rank has the same."""
    caps = [cap] if isinstance(cap, int) else list(cap)
    return caps[0] if len(set(caps)) == 1 else caps


def list_schedule(dag: PipelineDAG, cost: Mapping[GroupKey, float], rule: Any, cap: Cap) -> Orders:
    """Greedy list scheduling in simulated time; returns the per-rank task order.

    Whenever a rank is free it starts, among its tasks whose inputs have arrived, the one
    with the smallest priority key (``rule``: a name for `_priority`, or a function
    (group index, micro-batch) → key). A micro-batch is in flight on a rank from its
    first task there until its last; at most ``cap`` are (one number, or one per rank:
    ranks whose micro-batches take less memory can hold more of them), and new ones are
    admitted in micro-batch order (which also makes the greedy loop itself
    deadlock-free: the oldest unfinished micro-batch can always proceed).
    """
    groups, M, P = dag.groups, dag.microbatches, dag.stages
    caps = _rank_caps(cap, P)
    n = len(groups)
    gi = {g: i for i, g in enumerate(groups)}
    rank = [dag.rank(g) for g in groups]
    dur = [cost[g] for g in groups]
    succs = [[(gi[s], dag.comm_time(g, s)) for s in dag.succs[g]] for g in groups]
    prio = rule if callable(rule) else _priority(rule, dag, cost)
    npred = [len(dag.deps[g]) for g in groups]
    left_preds = [npred[i] for _ in range(M) for i in range(n)]  # index m*n + i
    ready_at = [0.0] * (n * M)
    per_rank = [sum(1 for i in range(n) if rank[i] == r) for r in range(P)]
    left_on_rank = [[per_rank[r]] * M for r in range(P)]
    ready: List[Dict[int, List[int]]] = [defaultdict(list) for _ in range(P)]
    for m in range(M):
        for i in range(n):
            if npred[i] == 0:
                ready[rank[i]][m].append(i)
    inflight: List[set] = [set() for _ in range(P)]
    next_admit = [0] * P
    free = [0.0] * P
    orders: Orders = {r: [] for r in range(P)}
    decision: List[Optional[Tuple[float, Tuple, int, int]]] = [None] * P
    version = [0] * P
    heap: List[Tuple[float, int, int]] = []  # (decision time, rank, version): stale entries skipped

    def decide(r: int) -> None:
        rd = ready[r]
        mbs = [m for m in inflight[r] if m in rd]
        if len(inflight[r]) < caps[r] and next_admit[r] in rd:
            mbs.append(next_admit[r])
        version[r] += 1
        decision[r] = None
        if not mbs:
            return
        cands = [(i, m, ready_at[m * n + i]) for m in mbs for i in rd[m]]
        t = max(free[r], min(c[2] for c in cands))
        best = min((prio(i, m), i, m) for i, m, ra in cands if ra <= t)
        decision[r] = (t, best[0], best[1], best[2])
        heapq.heappush(heap, (t, r, version[r]))

    for r in range(P):
        decide(r)
    remaining = n * M
    while remaining:
        while heap and heap[0][2] != version[heap[0][1]]:
            heapq.heappop(heap)
        if not heap:
            raise ScheduleError(f"list scheduling ({rule}, cap {cap}) stalled with {remaining} tasks left")
        r = heap[0][1]
        t, _, i, m = decision[r]
        end = t + dur[i]
        free[r] = end
        lst = ready[r][m]
        lst.remove(i)
        if not lst:
            del ready[r][m]
        if m not in inflight[r]:
            inflight[r].add(m)
            next_admit[r] += 1
        left_on_rank[r][m] -= 1
        if left_on_rank[r][m] == 0:
            inflight[r].discard(m)
        orders[r].append(Task(groups[i][0], groups[i][1], m))
        remaining -= 1
        dirty = {r}
        for s, comm in succs[i]:
            k = m * n + s
            ready_at[k] = max(ready_at[k], end + comm)
            left_preds[k] -= 1
            if left_preds[k] == 0:
                ready[rank[s]][m].append(s)
                dirty.add(rank[s])
        for d in dirty:
            decide(d)
    return orders


FORWARD_BACKWARD_ROUNDS = 4
"""Rounds of `forward_backward` run on the search's pick; on P = 32 SchNet and PaiNN
DAGs the first round gave most of the gain and four about all of it."""


def _tasks_by_time(dag: PipelineDAG, times: Mapping[Tuple[GroupKey, int], float], flip: bool) -> PriorityFn:
    """A list-scheduling key for ``dag`` from a schedule's task times, earliest first
    (``flip``: ``dag`` is the reversed one, whose micro-batch m is the forward M-1-m and
    whose first task is the forward last)."""
    M = dag.microbatches
    index = {g: i for i, g in enumerate(dag.groups)}
    key = {(index[g], M - 1 - m if flip else m): (-t if flip else t) for (g, m), t in times.items()}
    return lambda i, m: (key[(i, m)], m, i)


def forward_backward(dag: PipelineDAG, orders: Orders, cap: Cap, rounds: int = FORWARD_BACKWARD_ROUNDS) -> Tuple[float, Orders]:
    """Forward-backward improvement (as for project scheduling): list-schedule the reversed
    DAG from the end, latest-finishing task first, then the DAG again from the start,
    earliest task of that right-justified schedule first; repeat, keep the fastest.

    Why: a greedy list schedule decides at each instant with local priorities, so ranks
    that feed the busiest one can keep it waiting. Scheduled from the end, a task's
    priority is when the rest of the step needs it; scheduled from the start again on
    those times, the feeders run first. The same in-flight ``cap`` holds both ways (a
    micro-batch is in flight from its first task on a rank to its last, whichever way
    time runs). Returns (makespan, orders) of the fastest orders seen, ``orders`` among
    them; the makespan is `evaluate_orders`'."""
    M = dag.microbatches
    back = dag.reversed()
    best_ms, end = _run_orders(dag, orders)
    best = orders
    for _ in range(rounds):
        rev = list_schedule(back, back.cost, _tasks_by_time(back, end, flip=True), cap)
        backward = {r: [Task(t.chunk, t.phase, M - 1 - t.mb) for t in reversed(o)] for r, o in rev.items()}
        ms_b, end_b = _run_orders(dag, backward)
        start_b = {k: e - dag.cost[k[0]] for k, e in end_b.items()}
        forward = list_schedule(dag, dag.cost, _tasks_by_time(dag, start_b, flip=False), cap)
        ms_f, end = _run_orders(dag, forward)
        for ms, cand in ((ms_b, backward), (ms_f, forward)):
            if ms < best_ms:
                best_ms, best = ms, cand
    return best_ms, best


def hanayo(dag: PipelineDAG, max_in_flight: Optional[int] = None) -> Orders:
    """Hanayo's wave schedule, as we read it: phase-agnostic.

    Hanayo (wave placement, the baseline uses K=2 chunks per rank) orders a wave like
    1F1B does a chain, assuming backward ≈ 2 × forward as for ordinary models. Our
    interpretation on the folded four-phase DAG: the same list scheduler as WaveK, but
    fed assumed costs (F and G cost u, GG and FB cost 2u, u chosen so the total work
    matches the real one, real transfer times) and one fixed rule, ``backward_first``
    (drain before admitting new work, like 1F1B), with at most P micro-batches in flight.
    The order is then run with the real costs, which is where it loses.
    """
    if dag.layout != "folded":
        raise ScheduleError("hanayo schedules the folded (wave) layout; use 1f1b or gpipe on an unfolded DAG")
    weight = {g: 1.0 if g[1] in FORWARD_LIKE else 2.0 for g in dag.groups}
    total = sum(dag.cost.values())
    u = total / sum(weight.values()) if total > 0 else 1.0
    assumed = {g: u * w for g, w in weight.items()}
    return list_schedule(dag, assumed, "backward_first", max_in_flight or dag.stages)


def evaluate_orders(dag: PipelineDAG, orders: Orders) -> float:
    """Makespan of per-rank orders run as soon as possible: the timing model of `simulate`
    (one message per producer and destination, FIFO-serialised channels, copy costs on
    both ranks, the two copies of a message overlapping) without building programs, so
    that a search can afford many candidates. A message's receive is charged before its
    first consumer (programs may take it a little earlier, behind older messages of the
    same channel)."""
    return _run_orders(dag, orders)[0]


def _run_orders(dag: PipelineDAG, orders: Orders) -> Tuple[float, Dict[Tuple[GroupKey, int], float]]:
    """`evaluate_orders`' timing: the makespan and each task's end, keyed (group, mb)."""
    msg = _message_tensors(dag)
    dsts: Dict[GroupKey, List[Tuple[int, float, float]]] = defaultdict(list)
    recv_copy: Dict[Tuple[GroupKey, int], float] = {}
    for (g, dst), names in sorted(msg.items()):
        nbytes = sum(dag.nbytes.get(n, 0.0) for n in names)
        copy = dag.copy_time(names)
        dsts[g].append((dst, nbytes / dag.bandwidth_bytes_per_s if nbytes else 0.0, copy))
        recv_copy[(g, dst)] = copy
    rank_of = {g: dag.rank(g) for g in dag.groups}
    lat = dag.latency_s
    end: Dict[Tuple[GroupKey, int], float] = {}
    arrival: Dict[Tuple[GroupKey, int, int], float] = {}
    taken: Set[Tuple[GroupKey, int, int]] = set()  # messages received (and charged) already
    chan_free: Dict[Tuple[int, int], float] = defaultdict(float)
    P = dag.stages
    lists = [orders.get(r, []) for r in range(P)]
    pos, free = [0] * P, [0.0] * P
    left = sum(len(o) for o in lists)
    while left:
        progress = False
        for r in range(P):
            order = lists[r]
            while pos[r] < len(order):
                t = order[pos[r]]
                g, m = (t.chunk, t.phase), t.mb
                ready = free[r]
                incoming: List[Tuple[float, float]] = []  # (arrival, copy) of messages to receive now
                for d in dag.deps[g]:
                    if rank_of[d] == r:
                        v = end.get((d, m))
                    else:
                        v = arrival.get((d, m, r))
                        if v is not None and (d, m, r) not in taken:
                            incoming.append((v, recv_copy[(d, r)]))
                            continue
                    if v is None:
                        break
                    ready = v if v > ready else ready
                else:
                    for d in dag.deps[g]:
                        if rank_of[d] != r:
                            taken.add((d, m, r))
                    # `simulate`'s receive: the copy runs as the stream comes in
                    done = free[r]
                    for v, copy in sorted(incoming):
                        done = max(done + copy, v)
                    e = max(ready, done) + dag.cost[g]
                    end[(g, m)] = e
                    for dst, xfer, copy in dsts.get(g, ()):
                        go = max(e, chan_free[(r, dst)])
                        e += copy
                        stream = max(xfer, copy)
                        chan_free[(r, dst)] = go + stream
                        arrival[(g, m, dst)] = go + stream + lat
                    free[r] = e
                    pos[r] += 1
                    left -= 1
                    progress = True
                    continue
                break
        if not progress:
            stuck = {r: lists[r][pos[r]] for r in range(P) if pos[r] < len(lists[r])}
            raise ScheduleError(f"the task orders deadlock; next task per stuck rank: {stuck}")
    return max(free, default=0.0), end


@dataclass
class SearchResult:
    orders: Orders
    rule: str
    cap: Cap
    makespan: float
    candidates: List[Tuple[str, Any, float]]
    memory_bytes: Optional[List[float]] = None  # per rank, when the search had a memory budget
    memory_fits: Optional[bool] = None  # False: nothing fitted the budget, the count limit P was used


MemoryFn = Callable[[ProgramSet], Sequence[float]]


def simulated_stash(dag: PipelineDAG) -> MemoryFn:
    """Peak bytes per rank of the values held between groups, from the simulator (what a
    DAG alone can tell; `passes.memory.program_memory` replays a rank's real graphs)."""
    return lambda programs: simulate(programs, dag).peak_stash_bytes


MAX_IN_FLIGHT_PER_STAGE = 3
"""Against a memory budget WaveK tries in-flight caps up to min(M, 3P). A folded
micro-batch is in flight on a rank for most of its four-phase trip, so with 2P the
ranks still ran out of work in the fill at M = 4P; after forward-backward improvement,
3P lifted P = 32 SchNet (K = 2) from 0.81 to 0.84 efficiency and PaiNN from 0.81 to
0.86 at H200 costs, where the memory was there (the budget decides; ties go to fewer)."""


def _uniform_caps(P: int, top: int, budget: bool) -> List[int]:
    if not budget:
        return [top]
    grid = {max(1, P // 2), max(1, (3 * P) // 4), P, (5 * P) // 4, (3 * P) // 2, 2 * P, (5 * P) // 2, 3 * P}
    return sorted(c for c in grid if 1 <= c <= top)


def _scaled_caps(
    P: int, top: int, budget: float, points: Sequence[Tuple[Mapping[int, int], Sequence[float]]]
) -> Optional[List[int]]:
    """One cap per rank from two measured (in-flight per rank, bytes per rank) points: a
    straight line per rank, solved for the budget. Ranks whose micro-batches are light
    get more of them."""
    if len(points) < 2:
        return None
    (f1, m1), (f2, m2) = points[0], points[1]
    caps = []
    for r in range(P):
        if f1[r] != f2[r]:
            slope = (m1[r] - m2[r]) / (f1[r] - f2[r])
        else:
            slope = m1[r] / max(1, f1[r])
        if slope <= 0:
            caps.append(top)
            continue
        base = m1[r] - slope * f1[r]
        caps.append(int(min(top, max(1, math.floor((budget - base) / slope)))))
    return caps


NEAR_TIE = 0.01
"""Candidates within this fraction of the fastest one's makespan are a tie, which the one
holding the fewest micro-batches in flight wins: the simulator is not that precise (its
error against real runs is several per cent), so a faster-by-a-hair order is not worth
the memory of more micro-batches in flight."""
BASELINE_RULES = ("phase_agnostic", "gpipe")  # the baselines' orders among the candidates


Candidate = Tuple[float, int, str, Cap, Orders]  # a search candidate: (makespan, position, rule, cap, orders)


def _fewest_in_flight(pool: Sequence[Candidate], best: Candidate, fits: Callable[[Any], bool]) -> Candidate:
    """Among the candidates within `NEAR_TIE` of ``best``'s makespan, the one with the
    fewest micro-batches in flight (summed over ranks; then makespan, then position) for
    which ``fits`` holds; ``best`` itself if none holds fewer. The window stops at the
    baselines' own orders in the pool, so the pick is never slower than they are."""
    limit = min([best[0] * (1 + NEAR_TIE)] + [e[0] for e in pool if e[2] in BASELINE_RULES and e[0] >= best[0]])
    held = {e[1]: sum(in_flight(e[4]).values()) for e in pool if e[0] <= limit}
    for entry in sorted((e for e in pool if e[1] in held), key=lambda e: (held[e[1]], e[0], e[1])):
        if entry is best or held[entry[1]] >= held[best[1]]:
            return best
        if fits(entry):
            log.debug("wavek: %s cap=%s within %.0f %% of the fastest with %d in flight instead of %d", entry[2], cap_label(entry[3]), 100 * NEAR_TIE, held[entry[1]], held[best[1]])
            return entry
    return best


def wavek_search(
    dag: PipelineDAG,
    max_in_flight: Optional[int] = None,
    rules: Sequence[str] = RULES,
    caps: Optional[Sequence[Cap]] = None,
    memory_budget_bytes: Optional[float] = None,
    memory_of: Optional[MemoryFn] = None,
    strict: bool = False,
    improve: bool = True,
) -> SearchResult:
    """WaveK's search: each priority rule × in-flight cap is list-scheduled on the real
    costs and timed by the simulator's model; the shortest makespan that respects the
    limit is kept; candidates within `NEAR_TIE` (1 %) of it count as a tie, won by the one
    holding the fewest micro-batches in flight (then the first: deterministic).

    The limit is memory. By default it is a count: at most ``max_in_flight`` (default P)
    micro-batches in flight per rank. With ``memory_budget_bytes`` it is what a count
    stands for: bytes per rank, as ``memory_of(programs)`` reports them (default: the
    simulator's peak stash; the trainer and the bench pass the replay of
    `passes.memory.program_memory`, which counts everything a rank holds). Then uniform
    caps from P/2 up to 3P (at most ``max_in_flight``, default min(M, 3P)) are tried, and
    per-rank caps fitted to the budget from two measured points (a rank whose
    micro-batches hold less may keep more of them); candidates are checked in order of
    makespan, so only the fastest few are measured, and the first that fits wins. If
    none fits: with ``strict`` a `ScheduleError` names the budget and the smallest peak
    found; otherwise the count limit P is used, with a warning.

    The baselines' orders that respect the limit (the phase-agnostic wave order, GPipe's)
    are candidates too, so WaveK is never worse than them in the simulator. With
    ``improve`` the pick, the fastest candidate that fits and the fastest of other rules
    at its cap then go through `forward_backward` (the fastest result, if faster than the
    pick, is taken and named after its start with "+fb"; see `_improve_pick`).
    """
    P, M = dag.stages, dag.microbatches
    budget = memory_budget_bytes
    top = max_in_flight or (min(M, MAX_IN_FLIGHT_PER_STAGE * P) if budget is not None else P)
    cap_list: List[Cap] = list(caps) if caps is not None else list(_uniform_caps(P, top, budget is not None))
    for c in cap_list:
        if max(_rank_caps(c, P)) > top:
            raise ValueError(f"caps {cap_list} must lie in 1..max_in_flight={top}")
    measure = memory_of or simulated_stash(dag)
    pool: List[Candidate] = []

    def add(rule: str, cap: Cap, orders: Orders) -> None:
        if max(in_flight(orders).values(), default=0) > top:
            return
        ms = evaluate_orders(dag, orders)
        pool.append((ms, len(pool), rule, cap, orders))
        log.debug("wavek candidate %s cap=%s: makespan %.6g", rule, cap_label(cap), ms)

    for rule in rules:
        for cap in cap_list:
            add(rule, cap, list_schedule(dag, dag.cost, rule, cap))
    if dag.layout == "folded":
        add("phase_agnostic", min(P, top), hanayo(dag, min(P, top)))
    if M <= top or budget is not None:
        add("gpipe", M, gpipe(dag))
    tried = [(rule, cap_label(cap), ms) for ms, _, rule, cap, _ in pool]
    if not pool:
        raise ScheduleError("wavek: no candidate schedule within the in-flight limit")
    pool.sort(key=lambda c: (c[0], c[1]))
    fastest: Optional[Candidate] = None  # the fastest that fits, a start for `_improve_pick`
    if budget is None:
        fastest = pool[0]
        ms, _, rule, cap, orders = _fewest_in_flight(pool, pool[0], lambda e: True)
        best = SearchResult(orders, rule, cap, ms, tried)
    else:
        memo: Dict[int, List[float]] = {}

        def memory(entry: Candidate) -> List[float]:
            if entry[1] not in memo:
                memo[entry[1]] = [float(b) for b in measure(build_programs(dag, entry[4], "wavek"))]
            return memo[entry[1]]

        # per-rank caps, fitted on the fastest candidates at two uniform caps; not needed
        # when the fastest candidate of all fits (memory to spare: the default budget)
        points = []
        if max(memory(pool[0])) > budget * (1 + 1e-9):
            for c in sorted({P, max(1, P // 2)}, reverse=True):
                at_c = [e for e in pool if e[3] == c]
                if at_c:
                    points.append((in_flight(at_c[0][4]), memory(at_c[0])))
        scaled = _scaled_caps(P, top, budget, points)
        if scaled is not None and len(set(scaled)) > 1:
            for rule in rules:
                add(rule, scaled, list_schedule(dag, dag.cost, rule, scaled))
            pool.sort(key=lambda c: (c[0], c[1]))
            tried = [(rule, cap_label(cap), ms) for ms, _, rule, cap, _ in sorted(pool, key=lambda c: c[1])]
        best = None
        smallest: Optional[Tuple[float, Candidate]] = None
        def fits(entry: Candidate) -> bool:
            return max(memory(entry)) <= budget * (1 + 1e-9)

        for entry in pool:
            mem = memory(entry)
            if smallest is None or max(mem) < smallest[0]:
                smallest = (max(mem), entry)
            if fits(entry):
                fastest = entry
                entry = _fewest_in_flight(pool, entry, fits)
                ms, _, rule, cap, orders = entry
                best = SearchResult(orders, rule, cap, ms, tried, memory(entry), True)
                break
            log.debug("wavek candidate %s cap=%s: %.4g bytes, over the budget %.4g", entry[2], cap_label(entry[3]), max(mem), budget)
        if best is None:
            low = smallest[0] if smallest else float("nan")
            if strict:
                raise ScheduleError(
                    f"wavek: no schedule fits the memory budget of {budget / 2**20:.1f} MiB per rank; the smallest "
                    f"candidate needs {low / 2**20:.1f} MiB (in-flight caps {max(1, P // 2)}..{top} tried): raise the "
                    "memory cap, use smaller micro-batches or more stages"
                )
            log.warning("wavek: no schedule fits the memory budget of %.4g bytes (smallest %.4g); using the in-flight cap P=%d", budget, low, P)
            fallback = min((e for e in pool if max(in_flight(e[4]).values(), default=0) <= P and e[2] != "gpipe"), key=lambda e: (e[0], e[1]))
            ms, _, rule, cap, orders = fallback
            best = SearchResult(orders, rule, cap, ms, tried, memory(fallback), False)
    if improve:
        best = _improve_pick(dag, best, measure, budget, _improvement_starts(pool, fastest))
    log.info("wavek: rule %s, cap %s, simulated makespan %.6g s (%d candidates)", best.rule, cap_label(best.cap), best.makespan, len(best.candidates))
    return best


Start = Tuple[str, Cap, Orders]  # (rule, cap, orders) that forward-backward starts from
IMPROVEMENT_STARTS = 4
"""Forward-backward runs from at most this many candidates: the pick, the fastest that
fits and the fastest of other rules at that one's cap. Where it ends depends on where it
starts, by about 1 % between good starts (docs/runtime.md); each start costs about 4 s
at P = 32, M = 128."""


def _improvement_starts(pool: Sequence[Candidate], fastest: Optional[Candidate]) -> List[Start]:
    """Starts besides the pick for `_improve_pick`: the fastest candidate that fits, then
    the fastest of each other priority rule at the same cap (so of like memory), fastest
    first, up to `IMPROVEMENT_STARTS` - 1 of them."""
    if fastest is None:
        return []
    starts = [fastest]
    for entry in sorted(pool, key=lambda e: (e[0], e[1])):
        if len(starts) >= IMPROVEMENT_STARTS - 1:
            break
        if entry[3] == fastest[3] and entry[2] not in BASELINE_RULES and all(entry[2] != e[2] for e in starts):
            starts.append(entry)
    return [(rule, cap, orders) for _, _, rule, cap, orders in starts]


def _improve_pick(dag: PipelineDAG, pick: SearchResult, measure: MemoryFn, budget: Optional[float], others: Sequence[Start] = ()) -> SearchResult:
    """`forward_backward` from the search's pick and from ``others`` (other candidates,
    each under its own cap). The fastest result replaces the pick when it is faster and
    no heavier: within the memory budget (or, for a pick that fell back to the count cap,
    no more than its memory), and holding no more micro-batches in flight than the pick
    unless it gains more than `NEAR_TIE` (the tie rule of the search).

    Why several starts: the pick is often a near tie chosen for holding fewer in flight,
    and the improvement from the fastest candidate can end ahead of the improvement from
    the pick (NequIP at P = 4, M = 8: 0.91 against 0.89 efficiency)."""
    tried = list(pick.candidates)
    best = pick
    seen: List[Orders] = []
    held_pick = sum(in_flight(pick.orders).values())
    limit = (budget if pick.memory_fits else max(pick.memory_bytes or [math.inf])) if budget is not None else None
    for rule, cap, start in [(pick.rule, pick.cap, pick.orders), *others]:
        if any(start is s for s in seen):
            continue
        seen.append(start)
        ms, orders = forward_backward(dag, start, cap)
        tried.append((f"{rule}+fb", cap_label(cap), ms))
        if ms >= best.makespan:
            continue
        if sum(in_flight(orders).values()) > held_pick and ms > pick.makespan * (1 - NEAR_TIE):
            continue
        memory = None
        if limit is not None:
            memory = [float(b) for b in measure(build_programs(dag, orders, "wavek"))]
            if max(memory, default=0.0) > limit * (1 + 1e-9):
                log.debug("wavek: forward-backward orders from %s need %.4g bytes, over %.4g: not taken", rule, max(memory), limit)
                continue
        log.debug("wavek: forward-backward from %s improved the pick from %.6g to %.6g s", rule, pick.makespan, ms)
        best = replace(pick, orders=orders, rule=f"{rule}+fb", cap=cap, makespan=ms, memory_bytes=memory if memory is not None else pick.memory_bytes)
    return replace(best, candidates=tried)


def wavek(dag: PipelineDAG, max_in_flight: Optional[int] = None, **kw: Any) -> Orders:
    """WaveK: the four-phase-aware schedule (see `wavek_search`), as per-rank orders."""
    return wavek_search(dag, max_in_flight, **kw).orders


SCHEDULES: Dict[str, Callable[..., Orders]] = {"gpipe": gpipe, "1f1b": one_f_one_b, "hanayo": hanayo, "wavek": wavek}


# ---------------------------------------------------------------------------------------
# Lowering to programs
# ---------------------------------------------------------------------------------------


def _message_tensors(dag: PipelineDAG) -> Dict[Tuple[GroupKey, int], Tuple[str, ...]]:
    """(producer group, destination rank) → the values sent: union over consumers there."""
    out: Dict[Tuple[GroupKey, int], List[str]] = {}
    for g in dag.groups:
        src = dag.rank(g)
        for s in dag.succs[g]:
            dst = dag.rank(s)
            if dst == src:
                continue
            names = out.setdefault((g, dst), [])
            names += [n for n in dag.tensors[(g, s)] if n not in names]
    return {k: tuple(v) for k, v in out.items()}


def build_programs(dag: PipelineDAG, orders: Orders, schedule: str = "custom") -> ProgramSet:
    """Per-rank task orders → programs with explicit messages.

    One message per (producer group, micro-batch, destination rank), sent right after the
    producing compute. Receives go just before the first consumer, except that a channel
    (src, dst) is FIFO: to take message k a rank first takes the messages sent before it
    on that channel. That never waits longer than message k itself would, so it adds no
    deadlock to a deadlock-free order.
    """
    expected = set(dag.tasks())
    seen: Dict[Task, int] = {}
    for r, order in orders.items():
        for t in order:
            if t in seen:
                raise ScheduleError(f"task {t} is scheduled twice (ranks {seen[t]} and {r})")
            if t not in expected:
                raise ScheduleError(f"rank {r}: task {t} is not in the DAG")
            if dag.rank(t.group) != r:
                raise ScheduleError(f"task {t} is on rank {r}, but chunk {t.chunk} lives on rank {dag.rank(t.group)}")
            seen[t] = r
    missing = expected - set(seen)
    if missing:
        raise ScheduleError(f"{len(missing)} tasks are never scheduled, e.g. {sorted(missing)[:4]}")
    msg = _message_tensors(dag)
    dsts = {g: sorted({dst for (h, dst) in msg if h == g}) for g in dag.groups}
    channel: Dict[Tuple[int, int], List[Tuple[GroupKey, int]]] = defaultdict(list)
    for r in range(dag.stages):
        for t in orders.get(r, []):
            for dst in dsts[t.group]:
                channel[(r, dst)].append((t.group, t.mb))
    programs = []
    for r in range(dag.stages):
        actions: List[Any] = []
        taken: Dict[int, int] = defaultdict(int)
        got: set = set()
        for t in orders.get(r, []):
            for d in dag.deps[t.group]:
                src = dag.rank(d)
                if src == r or (d, t.mb) in got:
                    continue
                queue = channel[(src, r)]
                while True:
                    if taken[src] >= len(queue):
                        raise ScheduleError(f"rank {r} needs {d} mb {t.mb} from rank {src}, which never sends it")
                    g, m = queue[taken[src]]
                    taken[src] += 1
                    got.add((g, m))
                    actions.append(Recv(msg[(g, r)], src, g[0], g[1], m))
                    if (g, m) == (d, t.mb):
                        break
            actions.append(Compute(t.chunk, t.phase, t.mb))
            for dst in dsts[t.group]:
                actions.append(Send(msg[(t.group, dst)], dst, t.chunk, t.phase, t.mb))
        for src in range(dag.stages):
            if taken[src] != len(channel.get((src, r), ())):
                raise ScheduleError(f"rank {r} never receives {len(channel[(src, r)]) - taken[src]} messages from rank {src}")
        actions += [GradSync(), OptimizerStep()]
        programs.append(RankProgram(r, actions))
    meta = {"schedule": schedule, **dag.describe()}
    return ProgramSet(dag.stages, programs, meta)


def make_programs(dag: PipelineDAG, schedule: str = "wavek", **kw: Any) -> ProgramSet:
    """Schedule, lower, validate and simulate: the program set a runtime executes."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    extra: Dict[str, Any] = {}
    if schedule == "wavek":
        found = wavek_search(dag, **kw)
        orders = found.orders
        extra = {"wavek_rule": found.rule, "wavek_cap": cap_label(found.cap)}
        if kw.get("memory_budget_bytes") is not None:
            extra["wavek_memory_budget_bytes"] = float(kw["memory_budget_bytes"])
        if found.memory_bytes is not None:
            extra["wavek_memory_bytes"] = found.memory_bytes
            extra["wavek_memory_fits"] = found.memory_fits
    else:
        orders = SCHEDULES[schedule](dag, **kw)
    programs = build_programs(dag, orders, schedule)
    validate(programs, dag)
    sim = simulate(programs, dag)
    programs.meta.update(extra)
    programs.meta["simulated"] = {
        "makespan_s": sim.makespan,
        "bubble_fraction": sim.bubble_fraction,
        "efficiency": sim.efficiency,
        "efficiency_bound": efficiency_bound(sim, dag),
        "peak_in_flight": sim.peak_in_flight,
        "peak_stash_bytes": sim.peak_stash_bytes,
    }
    log.info("%s: P=%d M=%d simulated makespan %.6g s, bubble %.1f%%", schedule, dag.stages, dag.microbatches, sim.makespan, 100 * sim.bubble_fraction)
    return programs


# ---------------------------------------------------------------------------------------
# Validation: deadlock freedom and completeness
# ---------------------------------------------------------------------------------------


def _where(rank: int, index: int, action: Any) -> str:
    return f"rank {rank} action #{index} {action.render()}"


def validate(programs: ProgramSet, dag: Optional[PipelineDAG] = None) -> None:
    """Raise `ScheduleError` unless the programs run every task exactly once, on its rank,
    with every input available, and cannot deadlock.

    Semantics: sends are asynchronous, receives block; each (src, dst) pair is one FIFO
    channel, and a Recv must match the message at the head of its channel (same tag and
    tensor list). A rank whose Recv can never match is stuck; when no rank can move and
    some have not finished, that is a deadlock, reported with each stuck rank, its action
    and the channel. ``dag`` defaults to the description stored in ``programs.meta``.
    """
    dag = dag if dag is not None else PipelineDAG.from_description(programs.meta)
    P = programs.stages
    if P != dag.stages:
        raise ScheduleError(f"{P} rank programs for a DAG with {dag.stages} stages")
    where: Dict[Task, Tuple[int, int]] = {}
    for prog in programs.programs:
        r = prog.rank
        n_sync = n_step = 0
        for i, a in enumerate(prog.actions):
            if isinstance(a, Compute):
                t = Task(a.chunk, a.phase, a.mb)
                if a.group not in dag.cost or not 0 <= a.mb < dag.microbatches:
                    raise ScheduleError(f"{_where(r, i, a)}: no such task in the DAG")
                if dag.rank(a.group) != r:
                    raise ScheduleError(f"{_where(r, i, a)}: chunk {a.chunk} lives on rank {dag.rank(a.group)}")
                if t in where:
                    r0, i0 = where[t]
                    raise ScheduleError(f"task {t} runs twice: rank {r0} action #{i0} and rank {r} action #{i}")
                if n_step:
                    raise ScheduleError(f"{_where(r, i, a)}: compute after the optimizer step")
                where[t] = (r, i)
            elif isinstance(a, (Send, Recv)):
                peer = a.dst if isinstance(a, Send) else a.src
                if not 0 <= peer < P or peer == r:
                    raise ScheduleError(f"{_where(r, i, a)}: peer rank {peer} is invalid")
                if isinstance(a, Send) and dag.rank_of_chunk.get(a.chunk) != r:
                    raise ScheduleError(f"{_where(r, i, a)}: sends for chunk {a.chunk}, which is not on rank {r}")
            elif isinstance(a, GradSync):
                n_sync += 1
            elif isinstance(a, OptimizerStep):
                n_step += 1
                if n_sync == 0 and any(isinstance(b, GradSync) for b in prog.actions):
                    raise ScheduleError(f"{_where(r, i, a)}: optimizer step before the gradient sync")
        if n_sync > 1 or n_step > 1:
            raise ScheduleError(f"rank {r}: {n_sync} grad syncs and {n_step} optimizer steps (at most one each)")
    missing = [t for t in dag.tasks() if t not in where]
    if missing:
        raise ScheduleError(f"{len(missing)} tasks never run, e.g. {missing[:4]} (each task must appear exactly once)")
    _run_abstract(programs, dag)


def _run_abstract(programs: ProgramSet, dag: PipelineDAG) -> None:
    P = programs.stages
    acts = [p.actions for p in programs.programs]
    pc = [0] * P
    queues: Dict[Tuple[int, int], deque] = defaultdict(deque)
    done: List[set] = [set() for _ in range(P)]
    received: List[Dict[Tuple[int, str, int], Tuple[str, ...]]] = [{} for _ in range(P)]
    while True:
        progress = False
        for r in range(P):
            while pc[r] < len(acts[r]):
                a = acts[r][pc[r]]
                if isinstance(a, Compute):
                    for d in dag.deps[a.group]:
                        src = dag.rank(d)
                        tag = (d[0], d[1], a.mb)
                        if src == r:
                            if (d, a.mb) not in done[r]:
                                raise ScheduleError(f"{_where(r, pc[r], a)}: input group {d} mb {a.mb} (same rank) has not run yet")
                            continue
                        if tag not in received[r]:
                            raise ScheduleError(
                                f"{_where(r, pc[r], a)}: input from group {d} mb {a.mb} on rank {src} was not received before "
                                f"(no prior recv(..., src={src}, group={d}, mb={a.mb}))"
                            )
                        need = [n for n in dag.tensors.get((d, a.group), ()) if n not in received[r][tag]]
                        if need:
                            raise ScheduleError(f"{_where(r, pc[r], a)}: values {need} of group {d} mb {a.mb} were never received")
                    done[r].add((a.group, a.mb))
                elif isinstance(a, Send):
                    if ((a.chunk, a.phase), a.mb) not in done[r]:
                        raise ScheduleError(f"{_where(r, pc[r], a)}: sends values its rank has not computed yet")
                    queues[(r, a.dst)].append((r, pc[r], a))
                elif isinstance(a, Recv):
                    q = queues[(a.src, r)]
                    if not q or q[0][2].tag != a.tag or q[0][2].tensors != a.tensors:
                        break  # blocked (for now, or for ever if the head does not match)
                    q.popleft()
                    received[r][a.tag] = a.tensors
                pc[r] += 1
                progress = True
        if all(pc[r] == len(acts[r]) for r in range(P)):
            break
        if not progress:
            raise ScheduleError(_deadlock_report(programs, pc, queues))
    leftover = [(ch, q) for ch, q in sorted(queues.items()) if q]
    if leftover:
        (src, dst), q = leftover[0]
        r, i, a = q[0]
        raise ScheduleError(f"{_where(r, i, a)} is never received: channel {src}->{dst} still holds {len(q)} message(s) at the end")


def _deadlock_report(programs: ProgramSet, pc: List[int], queues: Mapping[Tuple[int, int], deque]) -> str:
    lines = ["deadlock: no rank can make progress"]
    acts = [p.actions for p in programs.programs]
    for r, prog in enumerate(acts):
        if pc[r] == len(prog):
            continue
        a = prog[pc[r]]
        ch = f"channel {a.src}->{r}"
        q = queues.get((a.src, r))
        if q:
            s_rank, s_i, s = q[0]
            why = f"{ch} holds {s.render()} (rank {s_rank} action #{s_i}) at its head, not this message"
        else:
            sender = acts[a.src]
            match = [j for j, b in enumerate(sender) if isinstance(b, Send) and b.dst == r and b.tag == a.tag]
            if not match:
                why = f"{ch} is empty and rank {a.src} has no matching send"
            elif pc[a.src] == len(sender):
                why = f"{ch} is empty and rank {a.src} finished"
            else:
                why = f"{ch} is empty; rank {a.src} sends it at action #{match[0]} but is stuck at action #{pc[a.src]}"
        lines.append(f"  {_where(r, pc[r], a)} waits: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------


@dataclass
class SimResult:
    """Simulated timing of one step: compute from the DAG's costs, transfers in parallel
    with compute (serialised per channel), receives blocking. ``busy`` is compute only;
    ``copies`` lists (rank, start, end, tag) of the CPU time messages cost the ranks."""

    makespan: float
    busy: List[float]
    bubble_fraction: float
    peak_in_flight: List[int]
    peak_stash_bytes: List[float]
    timeline: List[Tuple[int, float, float, Task]]
    stages: int
    microbatches: int
    transfers: List[Tuple[int, int, float, float, Tuple[int, str, int]]] = field(default_factory=list)
    copies: List[Tuple[int, float, float, Tuple[int, str, int]]] = field(default_factory=list)

    @property
    def ideal(self) -> float:
        """Total compute / P: the makespan with no bubble at all."""
        return sum(self.busy) / self.stages

    @property
    def efficiency(self) -> float:
        return self.ideal / self.makespan if self.makespan > 0 else 1.0

    @property
    def throughput(self) -> float:
        """Micro-batches per second."""
        return self.microbatches / self.makespan if self.makespan > 0 else math.inf


def efficiency_bound(result: SimResult, dag: PipelineDAG) -> float:
    """ideal / `makespan_lower_bound`: the efficiency no schedule on this partition and
    these links exceeds, what the partition's imbalance and the pipeline's fill and drain
    allow; ``result.efficiency`` below it is what a better order could still win."""
    bound = makespan_lower_bound(dag)
    return result.ideal / bound if bound > 0 else 1.0


def _peak(events: Iterable[Tuple[float, float]]) -> float:
    """Peak of a running sum of (time, delta) events; releases before acquisitions on ties."""
    level = peak = 0.0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        level += d
        peak = max(peak, level)
    return peak


def simulate(programs: ProgramSet, dag: PipelineDAG) -> SimResult:
    """Time the programs: compute from ``dag.cost``; a transfer starts when the send is
    issued and the channel is free, and takes latency + the longer of bytes / bandwidth
    and the sender's copy (`PipelineDAG.copy_cost`, charged to the sender's compute).
    The receiver's copy runs as the bytes come in (a socket's two copies stream), so a
    receive ends when both the receiver's copy, charged to its compute, and the stream
    have ended: a waiting receiver pays latency + the longest of transfer, sender's copy
    and its own copy, not their sum."""
    P = programs.stages
    acts = [p.actions for p in programs.programs]
    pc = [0] * P
    clock = [0.0] * P
    chan_free: Dict[Tuple[int, int], float] = defaultdict(float)
    queues: Dict[Tuple[int, int], deque] = defaultdict(deque)
    start: Dict[Tuple[GroupKey, int], float] = {}
    end: Dict[Tuple[GroupKey, int], float] = {}
    arrival: Dict[Tuple[GroupKey, int, int], float] = {}  # (group, mb, dst)
    recv_done: Dict[Tuple[GroupKey, int, int], float] = {}
    timeline: List[Tuple[int, float, float, Task]] = []
    transfers: List[Tuple[int, int, float, float, Tuple[int, str, int]]] = []
    copies: List[Tuple[int, float, float, Tuple[int, str, int]]] = []
    while True:
        progress = False
        for r in range(P):
            while pc[r] < len(acts[r]):
                a = acts[r][pc[r]]
                if isinstance(a, Compute):
                    t0 = clock[r]
                    clock[r] = t0 + dag.cost[a.group]
                    start[(a.group, a.mb)], end[(a.group, a.mb)] = t0, clock[r]
                    timeline.append((r, t0, clock[r], Task(a.chunk, a.phase, a.mb)))
                elif isinstance(a, Send):
                    nbytes = sum(dag.nbytes.get(n, 0.0) for n in a.tensors)
                    xfer = nbytes / dag.bandwidth_bytes_per_s if nbytes else 0.0
                    copy = dag.copy_time(a.tensors)
                    go = max(clock[r], chan_free[(r, a.dst)])
                    if copy:
                        copies.append((r, clock[r], clock[r] + copy, a.tag))
                        clock[r] += copy
                    stream = max(xfer, copy)  # the sender's copy feeds the link as it goes
                    chan_free[(r, a.dst)] = go + stream
                    arr = go + stream + dag.latency_s
                    arrival[((a.chunk, a.phase), a.mb, a.dst)] = arr
                    queues[(r, a.dst)].append((go + dag.latency_s, stream))
                    transfers.append((r, a.dst, go, arr, a.tag))
                elif isinstance(a, Recv):
                    q = queues[(a.src, r)]
                    if not q:
                        break
                    first_byte, stream = q.popleft()
                    copy = dag.copy_time(a.tensors)
                    # the receiver copies while the sender writes: done when its own copy
                    # is (charged to its compute) and the stream it reads has ended
                    done = max(clock[r] + copy, first_byte + max(stream, copy))
                    if copy:
                        copies.append((r, done - copy, done, a.tag))
                    clock[r] = done
                    recv_done[((a.chunk, a.phase), a.mb, r)] = clock[r]
                pc[r] += 1
                progress = True
        if all(pc[r] == len(acts[r]) for r in range(P)):
            break
        if not progress:
            raise ScheduleError(_deadlock_report(programs, pc, queues))
    makespan = max(clock, default=0.0)
    busy = [0.0] * P
    first: Dict[Tuple[int, int], float] = {}
    last: Dict[Tuple[int, int], float] = {}
    for r, t0, t1, t in timeline:
        busy[r] += t1 - t0
        key = (r, t.mb)
        first[key] = min(first.get(key, t0), t0)
        last[key] = max(last.get(key, t1), t1)
    flight: List[List[Tuple[float, float]]] = [[] for _ in range(P)]
    for (r, _m), t0 in first.items():
        flight[r] += [(t0, 1.0), (last[(r, _m)], -1.0)]
    stash = _stash_events(dag, end, arrival, recv_done)
    total_busy = sum(busy)
    bubble = 1.0 - total_busy / (P * makespan) if makespan > 0 else 0.0
    return SimResult(
        makespan=makespan,
        busy=busy,
        bubble_fraction=bubble,
        peak_in_flight=[int(_peak(f)) for f in flight],
        peak_stash_bytes=[_peak(s) for s in stash],
        timeline=timeline,
        stages=P,
        microbatches=dag.microbatches,
        transfers=transfers,
        copies=copies,
    )


def _stash_events(
    dag: PipelineDAG,
    end: Mapping[Tuple[GroupKey, int], float],
    arrival: Mapping[Tuple[GroupKey, int, int], float],
    recv_done: Mapping[Tuple[GroupKey, int, int], float],
) -> List[List[Tuple[float, float]]]:
    """Per rank, (time, ±bytes) of every value held between groups.

    A value lives on its producer's rank from the producer's end until its last local
    reader ends and its sends have arrived; on a receiving rank from the receive until
    its last reader there ends. Each value counts once per rank, whatever its readers.
    """
    readers: Dict[Tuple[GroupKey, str], List[GroupKey]] = defaultdict(list)
    for (prod, cons), names in dag.tensors.items():
        for n in names:
            readers[(prod, n)].append(cons)
    events: List[List[Tuple[float, float]]] = [[] for _ in range(dag.stages)]
    for (prod, name), cons in readers.items():
        size = dag.nbytes.get(name, 0.0)
        if size <= 0:
            continue
        src = dag.rank(prod)
        by_rank: Dict[int, List[GroupKey]] = defaultdict(list)
        for c in cons:
            by_rank[dag.rank(c)].append(c)
        for m in range(dag.microbatches):
            if (prod, m) not in end:
                continue
            for r, cs in by_rank.items():
                t_free = max(end.get((c, m), 0.0) for c in cs)
                if r == src:
                    t_avail = end[(prod, m)]
                else:
                    t_avail = recv_done.get((prod, m, r), end[(prod, m)])
                events[r] += [(t_avail, size), (max(t_free, t_avail), -size)]
            remote = [arrival[(prod, m, r)] for r in by_rank if r != src and (prod, m, r) in arrival]
            if remote and src not in by_rank:
                events[src] += [(end[(prod, m)], size), (max(remote), -size)]
            elif remote:
                # already counted locally until the last local reader; extend to the sends
                t_local = max(end.get((c, m), 0.0) for c in by_rank[src])
                if max(remote) > t_local:
                    events[src] += [(t_local, size), (max(remote), -size)]
    return events


# ---------------------------------------------------------------------------------------
# Gantt chart
# ---------------------------------------------------------------------------------------


def gantt_svg(result: SimResult, path: Optional[str] = None, title: str = "") -> str:
    """A Gantt chart of the simulated timeline as SVG (hand-written, no plotting library):
    one row per rank, one box per task coloured by phase, the micro-batch number inside,
    and the CPU time messages cost (`PipelineDAG.copy_cost`) as grey boxes."""
    from xml.sax.saxutils import escape

    width, left, right, top, row_h, gap = 1200.0, 70.0, 20.0, 50.0, 28.0, 6.0
    P = result.stages
    span = result.makespan if result.makespan > 0 else 1.0
    scale = (width - left - right) / span
    height = top + P * (row_h + gap) + 60.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">',
        f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        f'<text x="{left:.1f}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="{left:.1f}" y="40" font-size="11">makespan {result.makespan:.6g}, bubble '
        f"{100 * result.bubble_fraction:.1f}%, efficiency {100 * result.efficiency:.1f}%</text>",
    ]
    for r in range(P):
        y = top + r * (row_h + gap)
        out.append(f'<text x="{left - 8:.1f}" y="{y + row_h * 0.65:.1f}" font-size="12" text-anchor="end">rank {r}</text>')
        out.append(f'<rect x="{left:.1f}" y="{y:.1f}" width="{span * scale:.1f}" height="{row_h:.1f}" fill="#f3f3f3"/>')
    for r, t0, t1, task in result.timeline:
        x, w = left + t0 * scale, max((t1 - t0) * scale, 0.5)
        y = top + r * (row_h + gap)
        colour = PHASE_COLORS.get(task.phase, "#cccccc")
        label = f"{task.phase} c{task.chunk} mb{task.mb} [{t0:.4g}, {t1:.4g}]"
        out.append(
            f'<rect x="{x:.2f}" y="{y:.1f}" width="{w:.2f}" height="{row_h:.1f}" fill="{colour}" '
            f'stroke="#333" stroke-width="0.4"><title>{escape(label)}</title></rect>'
        )
        size = min(11.0, w / max(1, len(str(task.mb))) * 1.4, row_h * 0.6)
        out.append(
            f'<text x="{x + w / 2:.2f}" y="{y + row_h / 2 + size * 0.35:.2f}" font-size="{size:.1f}" '
            f'text-anchor="middle">{task.mb}</text>'
        )
    for r, t0, t1, tag in result.copies:
        x, w = left + t0 * scale, max((t1 - t0) * scale, 0.5)
        y = top + r * (row_h + gap)
        label = f"copy {tag[1]} c{tag[0]} mb{tag[2]} [{t0:.4g}, {t1:.4g}]"
        out.append(
            f'<rect x="{x:.2f}" y="{y:.1f}" width="{w:.2f}" height="{row_h:.1f}" fill="{COPY_COLOR}">'
            f"<title>{escape(label)}</title></rect>"
        )
    y_axis = top + P * (row_h + gap)
    for k in range(11):
        t = span * k / 10
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{top - 4:.1f}" x2="{x:.1f}" y2="{y_axis:.1f}" stroke="#999" stroke-width="0.3"/>')
        out.append(f'<text x="{x:.1f}" y="{y_axis + 14:.1f}" font-size="10" text-anchor="middle">{t:.3g}</text>')
    phases = sorted({t.phase for *_, t in result.timeline}, key=lambda p: (PHASE_POS.get(p, 9), p))
    for k, p in enumerate(phases):
        x = left + k * 80
        out.append(f'<rect x="{x:.1f}" y="{y_axis + 26:.1f}" width="14" height="14" fill="{PHASE_COLORS.get(p, "#ccc")}"/>')
        out.append(f'<text x="{x + 18:.1f}" y="{y_axis + 37:.1f}" font-size="12">{escape(p)}</text>')
    if result.copies:
        x = left + len(phases) * 80
        out.append(f'<rect x="{x:.1f}" y="{y_axis + 26:.1f}" width="14" height="14" fill="{COPY_COLOR}"/>')
        out.append(f'<text x="{x + 18:.1f}" y="{y_axis + 37:.1f}" font-size="12">message copy</text>')
    out.append("</svg>")
    svg = "\n".join(out) + "\n"
    if path is not None:
        with open(path, "w") as f:
            f.write(svg)
        log.info("wrote Gantt chart to %s", path)
    return svg
