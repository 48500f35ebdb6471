"""Coarsening: group the joint graph's forward nodes into units the partitioner moves.

A unit is the forward work of one module call at a chosen depth of the module tree
(``interactions.3``, ``embedding``, ``readout``); a ModuleList index counts as part of
the name, so each interaction block is its own unit. Forward nodes created by the root
module's own code attach to the latest unit they read from (energy pooling joins the
readout), or, if they read only graph inputs, form the ``<prologue>`` unit (strain,
geometry). Units are ordered topologically; mutually dependent units are merged. Every
backward node belongs to the unit of the forward node it folds onto.

With too few units for the requested number of chunks, the depth grows (submodules
become units) until there are enough or the module tree is exhausted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from .labels import FORWARD_NODE, IS_LOSS, MODULE, PHASE, compute_nodes

log = logging.getLogger(__name__)

PROLOGUE = "<prologue>"


@dataclass
class Units:
    names: List[str]  # topological order
    unit_of_node: Dict[str, int]  # every compute node (all phases) -> unit index
    edges: Dict[Tuple[int, int], List[str]]  # (low unit, high unit) -> values read across, any phase
    depth: int

    def nodes_of(self, unit: int) -> List[str]:
        return [n for n, u in self.unit_of_node.items() if u == unit]


def _module_key(path: str, depth: int) -> str:
    if path in ("", "loss"):
        return ""
    parts = path.split(".")
    out: List[str] = []
    for p in parts:
        out.append(p)
        if not p.isdigit() and len([q for q in out if not q.isdigit()]) >= depth:
            break
    # keep a following ModuleList index with its container
    if len(out) < len(parts) and parts[len(out)].isdigit():
        out.append(parts[len(out)])
    return ".".join(out)


def fold_root(node: fx.Node, by_name: Dict[str, fx.Node]) -> Optional[fx.Node]:
    """The F node a node folds onto (itself for F nodes)."""
    seen: Set[str] = set()
    while node is not None and node.meta.get(PHASE) != "F":
        if node.name in seen:
            return None
        seen.add(node.name)
        node = by_name.get(node.meta.get(FORWARD_NODE))
    return node


def _forward_keys(graph: fx.Graph, depth: int) -> Dict[str, str]:
    """Unit key of every F node."""
    keys: Dict[str, str] = {}
    first_seen: Dict[str, int] = {}
    for k, n in enumerate(compute_nodes(graph)):
        if n.meta.get(PHASE) != "F":
            continue
        key = _module_key(n.meta.get(MODULE, ""), depth)
        if key == "":
            producers = [keys[m.name] for m in n.all_input_nodes if m.name in keys]
            owned = [p for p in producers if p != PROLOGUE]
            key = max(owned, key=lambda p: first_seen[p]) if owned else PROLOGUE
        keys[n.name] = key
        first_seen.setdefault(key, k)
    return keys


def _topological_merge(keys: Dict[str, str], graph: fx.Graph) -> Tuple[List[str], Dict[str, str]]:
    """Order unit keys topologically; merge strongly connected groups."""
    order = list(dict.fromkeys(keys.values()))
    succ: Dict[str, Set[str]] = {k: set() for k in order}
    for n in compute_nodes(graph):
        if n.name not in keys:
            continue
        for m in n.all_input_nodes:
            if m.name in keys and keys[m.name] != keys[n.name]:
                succ[keys[m.name]].add(keys[n.name])
    # Tarjan's SCC, iterative enough for a few hundred units
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    sccs: List[List[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v], key=order.index):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(sorted(comp, key=order.index))

    for v in order:
        if v not in index:
            strong(v)
    rename = {k: comp[0] if len(comp) == 1 else "+".join(comp) for comp in sccs for k in comp}
    merged = {n: rename[k] for n, k in keys.items()}
    # Kahn's algorithm on the condensed graph, ties broken by first appearance
    names = list(dict.fromkeys(rename[k] for k in order))
    csucc: Dict[str, Set[str]] = {k: set() for k in names}
    indeg: Dict[str, int] = {k: 0 for k in names}
    for a, bs in succ.items():
        for b in bs:
            ra, rb = rename[a], rename[b]
            if ra != rb and rb not in csucc[ra]:
                csucc[ra].add(rb)
                indeg[rb] += 1
    ready = [k for k in names if indeg[k] == 0]
    out: List[str] = []
    while ready:
        ready.sort(key=names.index)
        k = ready.pop(0)
        out.append(k)
        for b in csucc[k]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return out, merged


def build_units(graph: fx.Graph, min_units: int = 1, max_depth: int = 6, min_depth: int = 1) -> Units:
    """Units at the shallowest depth (≥ ``min_depth``) that gives at least ``min_units``."""
    best = None
    for depth in range(min_depth, max_depth + 1):
        keys = _forward_keys(graph, depth)
        names, merged = _topological_merge(keys, graph)
        best = (depth, names, merged)
        if len(names) >= min_units:
            break
    depth, names, merged = best
    index = {k: i for i, k in enumerate(names)}
    unit_of_forward = {n: index[k] for n, k in merged.items()}
    log.info("units at depth %d: %s", depth, names)
    return assemble_units(graph, names, unit_of_forward, depth)


def assemble_units(graph: fx.Graph, names: List[str], unit_of_forward: Dict[str, int], depth: int) -> Units:
    """`Units` from the unit of every F node: backward nodes follow their fold root.

    ``edges`` lists every value read across units in any phase (keyed low → high unit
    index, the way the ILP counts hops): forward activations, the gradients flowing back
    over the same cut, and stash read by another unit's backward.
    """
    by_name = {n.name: n for n in graph.nodes}
    unit_of_node: Dict[str, int] = {}
    for n in compute_nodes(graph):
        root = fold_root(n, by_name)
        if root is not None and root.name in unit_of_forward:
            unit_of_node[n.name] = unit_of_forward[root.name]
    # Backward nodes with no forward link (rare: seeds with no linked neighbour) go with
    # the unit of the nearest unit-assigned input, else the last unit.
    for n in compute_nodes(graph):
        if n.name not in unit_of_node:
            found = [unit_of_node[m.name] for m in n.all_input_nodes if m.name in unit_of_node]
            unit_of_node[n.name] = max(found) if found else len(names) - 1
    edges: Dict[Tuple[int, int], List[str]] = {}
    for n in compute_nodes(graph):
        for m in n.all_input_nodes:
            if m.name in unit_of_node and not is_size_node(m):
                a, b = unit_of_node[m.name], unit_of_node[n.name]
                if a != b:
                    crossing = edges.setdefault((min(a, b), max(a, b)), [])
                    if m.name not in crossing:
                        crossing.append(m.name)
    return Units(names, unit_of_node, edges, depth)


def is_size_node(node: fx.Node) -> bool:
    """Integer/size arithmetic: cheap, recomputed in every group that needs it, never sent."""
    val = node.meta.get("val")
    return node.op == "call_function" and not isinstance(val, torch.Tensor) and not (
        isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)
    )
