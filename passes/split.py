"""Split: from a unit → chunk assignment, one GraphModule per (chunk, phase).

Placement. Every forward node sits on its unit's chunk; every backward node on the
chunk of the forward node it folds onto (SymFold). Two legalisations keep the
per-phase data flow pointing the way the phase travels, which a pipeline needs:

- phase order F < G < GG < FB: a node that reads a later phase's value moves to that
  phase (autograd sums gradient contributions wherever the last one arrives, so a sum
  of a GG and an FB contribution is FB work);
- direction: F and GG flow up the chunks, G and FB down; a node whose same-phase input
  lives on the wrong side moves next to it (again only sums of contributions from
  several chunks do this). Moved nodes are listed in `Placement.moved`.

Each group's graph takes as inputs exactly the values it reads from other groups
(boundary tensors from other chunks, stash from earlier phases of its own chunk,
parameters, batch fields) and returns the values other groups read. Size arithmetic
(``sym_size`` and friends) is recomputed where needed instead of being passed around.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .labels import PHASE, PHASES, compute_nodes
from .units import Units, is_size_node

log = logging.getLogger(__name__)

GroupKey = Tuple[int, str]  # (chunk, phase or phase group)


@dataclass(frozen=True)
class PhaseLayout:
    """How phases become pipeline tasks: which group each phase joins, and which way it flows.

    SymFold keeps the four phases apart (F up, G down, GG up, FB down). The unfolded
    baseline treats F+G as one forward and GG+FB as one backward over a linear chain
    (both phases of a group flow the same way).
    """

    group_of: Tuple[Tuple[str, str], ...]
    upward: Tuple[Tuple[str, bool], ...]

    def group(self, phase: str) -> str:
        return dict(self.group_of)[phase]

    def is_upward(self, group: str) -> bool:
        return dict(self.upward)[group]

    @property
    def groups(self) -> List[str]:
        return list(dict.fromkeys(g for _, g in self.group_of))

    def rank(self, phase: str) -> int:
        return self.groups.index(self.group(phase))


FOLDED = PhaseLayout(
    group_of=(("F", "F"), ("G", "G"), ("GG", "GG"), ("FB", "FB")),
    upward=(("F", True), ("G", False), ("GG", True), ("FB", False)),
)
UNFOLDED = PhaseLayout(
    group_of=(("F", "FWD"), ("G", "FWD"), ("GG", "BWD"), ("FB", "BWD")),
    upward=(("FWD", True), ("BWD", False)),
)
PHASE_RANK = {p: k for k, p in enumerate(PHASES)}


@dataclass
class Placement:
    chunk: Dict[str, int]
    phase: Dict[str, str]
    moved: List[str] = field(default_factory=list)  # nodes placed away from their fold chunk
    rephased: List[str] = field(default_factory=list)  # nodes moved to a later phase


def place_nodes(
    graph: fx.Graph,
    units: Units,
    chunk_of_unit: Sequence[int],
    layout: PhaseLayout = FOLDED,
    chunk_override: Optional[Mapping[str, int]] = None,
) -> Placement:
    """Chunk and phase of every node; ``chunk_override`` pins nodes (unfolded baseline)."""
    chunk: Dict[str, int] = {}
    phase: Dict[str, str] = {}
    placement = Placement(chunk, phase)
    for n in compute_nodes(graph):
        if is_size_node(n):
            continue
        p = n.meta[PHASE]
        producers = [m for m in n.all_input_nodes if m.name in chunk]
        for m in producers:
            if PHASE_RANK[phase[m.name]] > PHASE_RANK[p]:
                p = phase[m.name]
        if p != n.meta[PHASE]:
            placement.rephased.append(n.name)
        if chunk_override is not None and n.name in chunk_override:
            c = fold = chunk_override[n.name]
        else:
            c = fold = chunk_of_unit[units.unit_of_node[n.name]]
        group = layout.group(p)
        same = [chunk[m.name] for m in producers if layout.group(phase[m.name]) == group]
        if same:
            c = max(c, max(same)) if layout.is_upward(group) else min(c, min(same))
        if c != fold:
            placement.moved.append(n.name)
        chunk[n.name], phase[n.name] = c, p
    return placement


@dataclass
class Group:
    key: GroupKey
    gm: Optional[fx.GraphModule]  # None in a plan built to simulate only (`split_graph`)
    inputs: List[str]  # original node names read from outside the group
    outputs: List[str]  # original node names other groups (or the step's outputs) read
    nodes: List[str]


@dataclass
class SplitPlan:
    """All (chunk, phase) groups and a sequential order valid for the dependencies."""

    groups: Dict[GroupKey, Group]
    order: List[GroupKey]
    input_names: List[str]  # the joint graph's placeholders, in order
    output_args: List[Any]  # joint outputs: node names (str) or constants
    placement: Placement
    chunks: int
    layout: PhaseLayout = FOLDED

    def group_dependencies(self) -> Dict[GroupKey, List[GroupKey]]:
        """group -> the groups whose outputs it reads (the real (chunk, phase) DAG)."""
        producer = {name: key for key, g in self.groups.items() for name in g.outputs}
        deps: Dict[GroupKey, List[GroupKey]] = {}
        for key, g in self.groups.items():
            deps[key] = sorted({producer[i] for i in g.inputs if i in producer and producer[i] != key})
        return deps

    def run(self, flat_inputs: Sequence[Any]) -> List[Any]:
        """Execute every group in order in this process (the reference for the runtime)."""
        env: Dict[str, Any] = dict(zip(self.input_names, flat_inputs))
        for key in self.order:
            group = self.groups[key]
            outs = group.gm(*[env[i] for i in group.inputs])
            env.update(zip(group.outputs, outs))
        return [env[a] if isinstance(a, str) else a for a in self.output_args]


def _execution_order(keys: Sequence[GroupKey], chunks: int, layout: PhaseLayout) -> List[GroupKey]:
    order = []
    for g in layout.groups:
        cs = range(chunks) if layout.is_upward(g) else range(chunks - 1, -1, -1)
        order += [(c, g) for c in cs if (c, g) in keys]
    return order


def _build_group(gm: fx.GraphModule, key: GroupKey, members: List[fx.Node], member_set: set, build: bool = True) -> Group:
    graph = fx.Graph()
    env: Dict[str, Any] = {}
    inputs: List[str] = []

    def get(m: fx.Node) -> Any:
        if m.name in env:
            return env[m.name]
        if m.op == "get_attr" or (is_size_node(m) and m.name not in member_set):
            # recompute sizes / re-read constants locally
            new = graph.node_copy(m, get) if build else [get(i) for i in m.all_input_nodes]
        else:
            new = graph.placeholder(m.name) if build else None
            if build:
                new.meta = dict(m.meta)
            inputs.append(m.name)
        env[m.name] = new
        return new

    for n in members:
        env[n.name] = graph.node_copy(n, get) if build else [get(i) for i in n.all_input_nodes]
    outputs = [n.name for n in members if any(u not in member_set for u in n.users)]
    if not build:
        return Group(key, None, inputs, outputs, [n.name for n in members])
    graph.output(tuple(env[o] for o in outputs))
    graph.lint()
    return Group(key, fx.GraphModule(gm, graph), inputs, outputs, [n.name for n in members])


def split_graph(
    gm: fx.GraphModule,
    units: Units,
    chunk_of_unit: Sequence[int],
    chunks: int,
    layout: PhaseLayout = FOLDED,
    chunk_override: Optional[Mapping[str, int]] = None,
    build_modules: bool = True,
) -> SplitPlan:
    """One GraphModule per (chunk, phase group) from a unit → chunk assignment.
    ``build_modules=False``: the groups' nodes, inputs and outputs only (``gm`` None), a
    plan to simulate, not to run, at a fraction of the cost."""
    placement = place_nodes(gm.graph, units, chunk_of_unit, layout, chunk_override)
    members: Dict[GroupKey, List[fx.Node]] = {}
    for n in compute_nodes(gm.graph):
        if n.name in placement.chunk:
            key = (placement.chunk[n.name], layout.group(placement.phase[n.name]))
            members.setdefault(key, []).append(n)
    all_members = {n for ms in members.values() for n in ms}
    # Size nodes that the step's output reads directly are computed by the last group.
    groups: Dict[GroupKey, Group] = {}
    for key, ms in members.items():
        groups[key] = _build_group(gm, key, ms, set(ms), build_modules)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    output_args = [a.name if isinstance(a, fx.Node) else a for a in output_node.args[0]]
    for a in output_node.args[0]:
        if isinstance(a, fx.Node) and a not in all_members and a.op != "placeholder":
            raise AssertionError(f"step output {a.name} is produced by no group")
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    order = _execution_order(list(groups), chunks, layout)
    plan = SplitPlan(groups, order, input_names, output_args, placement, chunks, layout)
    _check_order(plan)
    log.info(
        "split into %d groups; %d nodes moved off their fold chunk, %d to a later phase",
        len(groups), len(placement.moved), len(placement.rephased),
    )
    return plan


def _check_order(plan: SplitPlan) -> None:
    position = {k: i for i, k in enumerate(plan.order)}
    for key, deps in plan.group_dependencies().items():
        for d in deps:
            assert position[d] < position[key], f"group {key} reads {d}, which runs later"
            if d[1] == key[1]:
                up = plan.layout.is_upward(key[1])
                assert (d[0] <= key[0]) if up else (d[0] >= key[0]), (
                    f"phase {key[1]} data flows {'down' if up else 'up'} from chunk {d[0]} to {key[0]}"
                )
