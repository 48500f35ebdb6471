"""Node labels shared by every pass: phase, module path and links between phases.

A node's ``meta`` carries:

- ``phase``: one of `PHASES` (F energy forward, G force gradient, GG double backward,
  FB backward of the forward);
- ``module``: dotted path of the module whose ``forward`` produced it ("" for the root);
- ``forward_node``: for G/GG/FB nodes, the name of the node it differentiates (a G node:
  the F node; a GG node: the G node; an FB node: the F node);
- ``is_loss``: set on loss nodes (labelled F or G by what they consume).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Optional

import torch.fx as fx

PHASES: tuple[str, ...] = ("F", "G", "GG", "FB")
PHASE = "phase"
MODULE = "module"
FORWARD_NODE = "forward_node"
IS_LOSS = "is_loss"
AUTOGRAD_DETACH = "autograd_detach"

# Backward of a node in phase p lands in phase BACKWARD_OF[p].
BACKWARD_OF: Dict[str, str] = {"F": "FB", "G": "GG"}


def compute_nodes(graph: fx.Graph):
    """The nodes that do work (everything but placeholders, outputs and attributes)."""
    return [n for n in graph.nodes if n.op == "call_function"]


def phase_counts(graph: fx.Graph) -> Dict[str, int]:
    counts = Counter(n.meta.get(PHASE) for n in compute_nodes(graph))
    return {p: counts.get(p, 0) for p in PHASES}


def module_phase_counts(graph: fx.Graph) -> Dict[str, Dict[str, int]]:
    """{module path: {phase: node count}} for the summary dump."""
    table: Dict[str, Counter] = {}
    for n in compute_nodes(graph):
        table.setdefault(n.meta.get(MODULE, ""), Counter())[n.meta.get(PHASE)] += 1
    return {m: {p: c.get(p, 0) for p in PHASES} for m, c in sorted(table.items())}


def forward_root(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    """Follow ``forward_node`` links to the F node a backward node folds onto."""
    by_name = {n.name: n for n in graph.nodes}
    seen = set()
    while node is not None and node.meta.get(PHASE) != "F":
        if node.name in seen:
            return None
        seen.add(node.name)
        node = by_name.get(node.meta.get(FORWARD_NODE))
    return node


def check_labels(graph: fx.Graph) -> None:
    """Raise AssertionError on the first node that breaks a label invariant."""
    by_name = {n.name: n for n in graph.nodes}
    for n in compute_nodes(graph):
        phase = n.meta.get(PHASE)
        assert phase in PHASES, f"node {n.name} ({n.target}) has no phase (got {phase!r})"
        assert MODULE in n.meta, f"node {n.name} has no module path"
        if phase == "F":
            continue
        link = n.meta.get(FORWARD_NODE)
        if link is None and n.meta.get(IS_LOSS):
            continue
        assert link in by_name, f"{phase} node {n.name} links to missing forward node {link!r}"
        target = by_name[link]
        want = {"G": ("F",), "FB": ("F",), "GG": ("G",)}[phase]
        assert target.meta.get(PHASE) in want, (
            f"{phase} node {n.name} links to {link} in phase {target.meta.get(PHASE)}, expected {want}"
        )
