"""Segments: cut units too heavy to balance into pieces of their own forward code, keeping the fold.

Module units cannot always be balanced. PaiNN's message code (gather, filter product,
scatter) is one unit worth about a whole rank's share at P = 8, and a NequIP interaction
block is one unit because its own code and its tensor product call each other (they
form one strongly connected group). No assignment of such units is balanced.

A heavy unit's F nodes are cut, in graph order, into contiguous segments of similar
*folded* cost (an F node plus every backward node that folds onto it), so each segment
still carries all four phases of its own forward work. Within a window around each
even cut, the cut goes where the fewest bytes cross it in any phase (activations,
gradients, stash), because the ILP pays for every byte it ships. Contiguous pieces of a
topological order keep forward data flow pointing up the chunks.

The fold can still break at a cut: a backward node may read a same-phase value that
folds onto the other side (G and FB must flow down, GG up). The split's own placement
(`place_nodes`) finds every such node when each segment sits on a chunk of its own; the
segments between its fold and where it would have to move are merged again, until only
sums of gradient contributions move (the same exception the module units have).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.fx as fx

from .labels import PHASE, compute_nodes
from .split import FOLDED, place_nodes
from .units import Units, assemble_units, fold_root

log = logging.getLogger(__name__)

SEGMENTS_PER_SHARE = 6
"""A heavy unit is cut into pieces of about a sixth of one chunk's even share."""
HEAVY_FRACTION = 0.25
"""A unit is heavy when it costs more than this fraction of one chunk's even share: one
such unit on the wrong side of a cut can cost up to that much imbalance."""
CUT_WINDOW = 0.3
"""Cuts may move this fraction of a segment's cost away from the even point to cross fewer bytes."""
MAX_MERGE_ROUNDS = 50
MOVABLE_SUMS = (torch.ops.aten.add.Tensor,)


def segment_units(
    graph: fx.Graph,
    units: Units,
    node_times: Mapping[str, float],
    out_bytes: Mapping[str, float],
    chunk_share: float,
) -> Units:
    """Units with every unit costing more than ``HEAVY_FRACTION`` of ``chunk_share`` (seconds,
    all four phases) cut into fold-safe segments of about ``chunk_share / SEGMENTS_PER_SHARE``."""
    by_name = {n.name: n for n in graph.nodes}
    nodes = list(compute_nodes(graph))
    root: Dict[str, str] = {}
    for n in nodes:
        r = fold_root(n, by_name)
        if r is not None:
            root[n.name] = r.name
    folded: Dict[str, float] = {}
    for n in nodes:
        if n.name in root:
            folded[root[n.name]] = folded.get(root[n.name], 0.0) + node_times.get(n.name, 0.0)
    unit_cost = [0.0] * len(units.names)
    for name, u in units.unit_of_node.items():
        unit_cost[u] += node_times.get(name, 0.0)
    forward_of_unit: List[List[str]] = [[] for _ in units.names]
    for n in nodes:
        if n.meta.get(PHASE) == "F" and n.name in units.unit_of_node:
            forward_of_unit[units.unit_of_node[n.name]].append(n.name)

    pieces: List[Tuple[int, List[str]]] = []  # (original unit, its F nodes in graph order)
    target = chunk_share / SEGMENTS_PER_SHARE
    phase = place_nodes(graph, units, list(range(len(units.names))), FOLDED).phase  # after rephasing
    for u, forward in enumerate(forward_of_unit):
        if unit_cost[u] > HEAVY_FRACTION * chunk_share and len(forward) > 1 and target > 0:
            count = min(len(forward), math.ceil(unit_cost[u] / target))
            allowed = _fold_safe_cuts(nodes, forward, root, phase)
            cuts = _choose_cuts(forward, folded, _crossing_bytes(nodes, forward, root, out_bytes), allowed, count)
            bounds = [0] + cuts + [len(forward)]
            pieces.extend((u, forward[a:b]) for a, b in zip(bounds, bounds[1:]))
        else:
            pieces.append((u, forward))

    for _ in range(MAX_MERGE_ROUNDS):
        segmented = _assemble(graph, units, pieces)
        spans = _fold_breaks(graph, segmented, pieces)
        if not spans:
            break
        pieces = _merge(pieces, spans)
    else:
        log.warning("segments: fold breaks remain after %d merge rounds; keeping the module units", MAX_MERGE_ROUNDS)
        return units
    log.info("segments: %d units -> %d (heavy units cut at %.3g s per piece)", len(units.names), len(pieces), target)
    return segmented


def _crossing_bytes(nodes: Sequence[fx.Node], forward: List[str], root: Mapping[str, str], out_bytes: Mapping[str, float]) -> List[float]:
    """Bytes crossing the cut before position ``i`` of ``forward`` (any phase, either way)."""
    pos = {f: k for k, f in enumerate(forward)}
    diff = [0.0] * (len(forward) + 1)
    for n in nodes:
        a = pos.get(root.get(n.name))
        if a is None:
            continue
        reach = [pos[root[u.name]] for u in n.users if root.get(u.name) in pos]
        lo, hi = min(reach + [a]), max(reach + [a])
        if hi > lo:
            diff[lo + 1] += out_bytes.get(n.name, 0.0)
            diff[hi + 1] -= out_bytes.get(n.name, 0.0)
    crossing, running = [], 0.0
    for d in diff[:-1]:
        running += d
        crossing.append(running)
    return crossing


def _fold_safe_cuts(nodes: Sequence[fx.Node], forward: List[str], root: Mapping[str, str], phase: Mapping[str, str]) -> List[bool]:
    """``allowed[i]``: a cut before position ``i`` of ``forward`` moves no non-sum node.

    A node reading a same-phase value folded further along its phase's direction (up for
    F and GG, down for G and FB) would have to follow it: no cut may separate the two.
    """
    pos = {f: k for k, f in enumerate(forward)}
    diff = [0] * (len(forward) + 1)
    for n in nodes:
        a = pos.get(root.get(n.name))
        if a is None or n.name not in phase or n.target in MOVABLE_SUMS:
            continue
        group = FOLDED.group(phase[n.name])
        for m in n.all_input_nodes:
            b = pos.get(root.get(m.name))
            if b is None or m.name not in phase or FOLDED.group(phase[m.name]) != group:
                continue
            if (b > a) if FOLDED.is_upward(group) else (b < a):
                lo, hi = min(a, b), max(a, b)
                diff[lo + 1] += 1
                diff[hi + 1] -= 1
    allowed, running = [], 0
    for d in diff[:-1]:
        running += d
        allowed.append(running == 0)
    return allowed


def _choose_cuts(forward: List[str], folded: Mapping[str, float], crossing: List[float], allowed: List[bool], count: int) -> List[int]:
    """Up to ``count - 1`` increasing fold-safe cut positions near the even cost points, crossing few bytes."""
    prefix = [0.0]
    for f in forward:
        prefix.append(prefix[-1] + folded.get(f, 0.0))
    total = prefix[-1]
    step = total / count
    cuts: List[int] = []
    for k in range(1, count):
        ideal = k * step
        lo = cuts[-1] + 1 if cuts else 1
        candidates = [i for i in range(lo, len(forward)) if allowed[i]]
        options = [i for i in candidates if abs(prefix[i] - ideal) <= CUT_WINDOW * step]
        if not options:
            nearest = min(candidates, key=lambda i: abs(prefix[i] - ideal), default=None)
            if nearest is None:
                break
            options = [nearest]
        cuts.append(min(options, key=lambda i: (crossing[i], abs(prefix[i] - ideal))))
    return sorted(set(cuts))


def _assemble(graph: fx.Graph, units: Units, pieces: List[Tuple[int, List[str]]]) -> Units:
    names, unit_of_forward = [], {}
    counts: Dict[int, int] = {}
    for u, _ in pieces:
        counts[u] = counts.get(u, 0) + 1
    seen: Dict[int, int] = {}
    for k, (u, forward) in enumerate(pieces):
        seen[u] = seen.get(u, 0) + 1
        names.append(units.names[u] if counts[u] == 1 else f"{units.names[u]}#{seen[u] - 1}")
        unit_of_forward.update({f: k for f in forward})
    return assemble_units(graph, names, unit_of_forward, units.depth)


def _fold_breaks(graph: fx.Graph, segmented: Units, pieces: List[Tuple[int, List[str]]]) -> List[Tuple[int, int]]:
    """Segment spans that must be merged: a non-sum node would leave its fold chunk."""
    placement = place_nodes(graph, segmented, list(range(len(segmented.names))), FOLDED)
    by_name = {n.name: n for n in graph.nodes}
    spans = []
    for name in placement.moved:
        if by_name[name].target in MOVABLE_SUMS:
            continue
        a, b = segmented.unit_of_node[name], placement.chunk[name]
        lo, hi = min(a, b), max(a, b)
        if pieces[lo][0] == pieces[hi][0]:  # within one original unit: a cut we made
            log.debug("segments: %s (%s) would leave segment %d for %d", name, by_name[name].target, a, b)
            spans.append((lo, hi))
    return spans


def _merge(pieces: List[Tuple[int, List[str]]], spans: List[Tuple[int, int]]) -> List[Tuple[int, List[str]]]:
    """Join the pieces inside every span (spans never cross original units)."""
    join = [False] * len(pieces)  # join[k]: piece k joins piece k - 1
    for lo, hi in spans:
        for k in range(lo + 1, hi + 1):
            join[k] = True
    out: List[Tuple[int, List[str]]] = []
    for k, (u, forward) in enumerate(pieces):
        if join[k]:
            out[-1] = (u, out[-1][1] + forward)
        else:
            out.append((u, list(forward)))
    return out
