"""Replicate cheap data-only forward values (geometry) on the chunks that read them.

Edge vectors, distances, radial bases and cutoffs are computed from the batch alone
(positions, cell, strain, edge index, shifts and buffers: no parameter), yet every
interaction block reads them, so a partition ships them, per edge, to every chunk: in F,
and again as stash that the block's G, GG and FB read. Every rank holds the batch, so a
chunk can compute them itself instead.

The rewrite copies such a value, with the data-only nodes it is computed from, onto each
chunk that reads it from another chunk, and points that chunk's readers (in any phase)
at the copy. The copies are forward nodes of that chunk: its later phases read them as
stash of its own. The gradient side is untouched: each chunk's G nodes still send their
contribution to the geometry's gradient (and so to the forces and stress) to the chunk
that owns the original, where the contributions are summed, as before. Copies compute
the same ops on the same inputs, so the step is bit-for-bit the step it was.

``auto`` replicates a value where recomputing it (all the data-only nodes behind it) costs
less time than sending it one hop; ``always`` wherever it is read remotely; ``never``
keeps every transfer.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Set, Tuple

import torch.fx as fx

from .labels import PHASE, compute_nodes
from .units import is_size_node

log = logging.getLogger(__name__)

POLICIES = ("auto", "always", "never")
PARAM_PREFIX = "param_"
COPY_SUFFIX = "_replica"


def data_only_values(graph: fx.Graph) -> Set[str]:
    """F nodes computed from batch fields and buffers alone (no parameter, no collective)."""
    from janus_compile.runtime.collectives import GP_ALL_REDUCE

    found: Set[str] = set()
    for n in graph.nodes:
        if n.op != "call_function" or n.meta.get(PHASE) != "F" or is_size_node(n) or n.target is GP_ALL_REDUCE:
            continue
        ok = True
        for m in n.all_input_nodes:
            if m.op == "placeholder":
                ok = not m.name.startswith(PARAM_PREFIX)
            elif m.op == "get_attr" or is_size_node(m):
                continue
            else:
                ok = m.name in found
            if not ok:
                break
        if ok:
            found.add(n.name)
    return found


def closure(graph: fx.Graph, names: Set[str], data_only: Set[str]) -> List[fx.Node]:
    """``names`` and every data-only node they are computed from, in graph order."""
    by_name = {n.name: n for n in graph.nodes}
    need: Set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in need:
            continue
        need.add(name)
        stack.extend(m.name for m in by_name[name].all_input_nodes if m.name in data_only)
    return [n for n in graph.nodes if n.name in need]


def choose_replicated(
    graph: fx.Graph,
    node_times: Mapping[str, float],
    out_bytes: Mapping[str, float],
    bandwidth_bytes_per_s: float,
    policy: str = "auto",
) -> Set[str]:
    """Data-only values worth recomputing wherever another chunk reads them."""
    if policy not in POLICIES:
        raise ValueError(f"replicate={policy!r}: choose one of {POLICIES}")
    if policy == "never":
        return set()
    data_only = data_only_values(graph)
    if policy == "always":
        return data_only
    chosen = set()
    for name in data_only:
        recompute = sum(node_times.get(n.name, 0.0) for n in closure(graph, {name}, data_only))
        send = out_bytes.get(name, 0.0) / bandwidth_bytes_per_s
        if recompute < send:
            chosen.add(name)
    return chosen


def replicate_on_readers(
    gm: fx.GraphModule, replicated: Set[str], chunk_of: Mapping[str, int]
) -> Tuple[fx.GraphModule, Dict[str, int], Dict[str, str]]:
    """A copy of ``gm`` in which every chunk reading a value of ``replicated`` from another
    chunk computes it itself.

    ``chunk_of`` is the chunk of every compute node. Returns the new module, the chunk of
    every copy (to pin it in the split) and copy name -> original name.
    """
    graph = fx.Graph()
    remap: Dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, remap))
    by_name = {n.name: n for n in graph.nodes}
    data_only = data_only_values(graph)
    readers: Dict[int, Dict[str, List[fx.Node]]] = {}  # chunk -> value -> reading nodes there
    for name in sorted(replicated):
        value = by_name[name]
        for user in value.users:
            c = chunk_of.get(user.name)
            if c is None or c == chunk_of.get(name):
                continue
            readers.setdefault(c, {}).setdefault(name, []).append(user)
    pinned: Dict[str, int] = {}
    original: Dict[str, str] = {}
    for c in sorted(readers):
        wanted = readers[c]
        copies: Dict[str, fx.Node] = {}
        # each copy right after its original: its inputs (the original's, or copies made
        # just after theirs) come before it, and so does it before every reader
        for n in closure(graph, set(wanted), data_only):
            with graph.inserting_after(n):
                new = graph.node_copy(n, lambda m: copies.get(m.name, m))
            if hasattr(new, "_rename"):
                new._rename(f"{n.name}{COPY_SUFFIX}{c}")
            new.meta = dict(n.meta)
            copies[n.name] = new
            pinned[new.name] = c
            original[new.name] = n.name
        for name, users in wanted.items():
            for user in users:
                user.replace_input_with(by_name[name], copies[name])
    graph.lint()
    out = fx.GraphModule(gm, graph)
    log.info("replicated %d data-only values on %d chunks (%d copied nodes)", len(replicated), len(readers), len(pinned))
    return out, pinned, original
