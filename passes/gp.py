"""Graph parallelism: shard every per-edge tensor across a gp group, sum where edges meet.

An MLIP's memory and work are dominated by per-edge tensors (messages, radial bases,
spherical harmonics, their gradients); atoms are few next to edges. This pass makes the
joint graph (all four phases) run on a *shard* of the edges: every gp rank feeds the
same atoms but only its own slice of ``edge_index``/``shifts``, so every tensor whose
symbolic shape contains ``edges`` holds that rank's edges only and costs 1/gp of the
memory and compute.

Values that are not per-edge (atom features, energies, forces, stress, parameter
gradients) must stay exact and identical on every gp rank. They are computed from edge
tensors only through *edge reductions*: ops whose input has an edge dimension and whose
output does not (``index_add`` / ``index_put(accumulate)`` / ``scatter_add`` from edges
to atoms or structures, ``sum`` over edges, ``mm`` contracting edges for a weight
gradient). On a shard such an op yields a partial sum, so the pass inserts
``januspipe.gp_all_reduce`` (a sum over the gp group, `runtime/collectives.py`) right
after it, in whichever phase it sits. An accumulating op whose destination already
holds a value (``index_add(x, ..., msg)`` with ``x`` not zeros) is rewritten to
``x + all_reduce(index_add(zeros_like(x), ..., msg))``, so ``x`` is not counted gp
times. Any other op from edges to non-edges (a max, a mean, a gather) has no such
rewrite and is refused with the op and module named, and so is a per-edge op that reads
other edges (a scan, sort or softmax along the edges, a gather from an edge tensor along
the edges such as a reverse-edge lookup), since those edges may live on another rank.

Atoms stay replicated. Partitioning atoms as well (domain decomposition) would need
halo exchanges before every gather from atoms to edges; see docs/parallelism.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Set

import sympy
import torch
import torch.fx as fx

from ..errors import JanusError
from ..runtime.collectives import GP_ALL_REDUCE
from .cost import nbytes, op_name
from .fake_inputs import NAMED_SYMBOLS, SHAPE
from .labels import MODULE, PHASE, PHASES

log = logging.getLogger(__name__)

EDGES = NAMED_SYMBOLS["edges"]

# Sums over the edge dimension: exact on shards once their partial results are summed.
_SUM_REDUCTIONS = {"index_add", "index_put", "_index_put_impl", "scatter_add", "sum", "mm", "bmm", "mv", "dot", "matmul"}
# Ops that accumulate into their first argument: the destination must not be summed gp times.
_ACCUMULATING = {"index_add", "index_put", "_index_put_impl", "scatter_add"}
# Ops that only read an edge tensor's size, dtype or device.
_METADATA_ONLY = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "new_zeros", "new_empty", "new_ones", "new_full"}
# Ops that mix values along one dimension: wrong on shards if that dimension is the edges.
_ALONG_DIM = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "_softmax", "_log_softmax", "softmax",
              "log_softmax", "sort", "argsort", "topk", "flip", "roll"}
# Gathers: reading an edge tensor at other edges' positions crosses shards.
_GATHERS = {"index_select", "gather", "index", "take", "_unsafe_index", "take_along_dim"}
# Producers of all-zero tensors (a destination that may be all-reduced as it is).
_ZEROS = {"new_zeros", "zeros", "zeros_like"}


class GraphParallelError(JanusError, ValueError):
    """The model reduces over edges in a way that sharding edges cannot reproduce."""


@dataclass
class GraphParallelReport:
    """What the pass did: all-reduces per phase and their bytes per call (symbolic)."""

    all_reduces: Dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    bytes: Dict[str, sympy.Expr] = field(default_factory=lambda: {p: sympy.Integer(0) for p in PHASES})
    rewritten_accumulations: int = 0
    sharded_nodes: int = 0

    def table(self) -> str:
        rows = ["| phase | all-reduces | bytes per step (symbolic) |", "|---|---|---|"]
        rows += [f"| {p} | {self.all_reduces[p]} | `{self.bytes[p]}` |" for p in PHASES]
        return "\n".join(rows)


def _has_edges(shape) -> bool:
    if shape is None:
        return False
    if isinstance(shape, list):
        return any(_has_edges(s) for s in shape)
    return any(EDGES in getattr(d, "free_symbols", ()) for d in shape)


def is_edge_tensor(node: fx.Node) -> bool:
    """True when the node's value has an edge dimension (it is sharded under gp)."""
    return _has_edges(node.meta.get(SHAPE))


def _where(node: fx.Node) -> str:
    return f"node {node.name} ({node.target}) in module {node.meta.get(MODULE) or '<root>'!r}, phase {node.meta.get(PHASE)}"


def _is_zeros(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    name = op_name(node)
    if name in _ZEROS:
        return True
    return name in ("full", "new_full") and len(node.args) > 1 and node.args[-1] == 0


def _copy_meta(dst: fx.Node, src: fx.Node) -> None:
    for key, value in src.meta.items():
        if key not in ("stack_trace",):
            dst.meta[key] = value


def shard_edges(gm: fx.GraphModule) -> GraphParallelReport:
    """Rewrite ``gm`` in place for graph parallelism (see the module docstring)."""
    graph = gm.graph
    report = GraphParallelReport()
    edge_syms: Set[fx.Node] = set()  # symbolic ints computed from edge sizes
    for node in list(graph.nodes):
        if node.op == "output":
            for out in _flat_nodes(node.args):
                if is_edge_tensor(out):
                    raise GraphParallelError(
                        f"the training step returns a per-edge tensor ({out.name}); with graph parallelism every "
                        "rank holds only its shard of the edges. Return per-atom or per-structure outputs only, "
                        "or set graph_parallel=1."
                    )
            continue
        if node.op != "call_function":
            continue
        name = op_name(node)
        if is_edge_tensor(node):
            _check_local_to_each_edge(node, name)
            report.sharded_nodes += 1
            continue
        inputs = node.all_input_nodes
        if not isinstance(node.meta.get("val"), torch.Tensor) and not isinstance(node.meta.get("val"), (list, tuple)):
            # a symbolic int (or other scalar): remember whether it counts edges
            if any(is_edge_tensor(i) or i in edge_syms for i in inputs):
                edge_syms.add(node)
            continue
        if name in _METADATA_ONLY:
            continue
        if any(i in edge_syms for i in inputs):
            raise GraphParallelError(
                f"{_where(node)} uses the number of edges in a per-atom or per-structure value; on a "
                "shard that is the local count. Normalise by a count of atoms or structures instead, or set "
                "graph_parallel=1."
            )
        edge_inputs = [i for i in inputs if is_edge_tensor(i)]
        if not edge_inputs:
            continue
        if name not in _SUM_REDUCTIONS or (name in ("index_put", "_index_put_impl") and not _accumulates(node)):
            raise GraphParallelError(
                f"{_where(node)} reduces per-edge values with {name!r}, which is not a sum: it cannot be "
                "computed from shards of the edges. Graph parallelism supports sums over edges (index_add, "
                "scatter_add, index_put with accumulate=True, sum, matmul); rewrite the reduction as one of "
                "those, or set graph_parallel=1."
            )
        _insert_all_reduce(graph, node, name, report)
    graph.lint()
    gm.recompile()
    log.info(
        "graph parallel: %d sharded nodes, all-reduces per phase %s, %d accumulations rewritten",
        report.sharded_nodes, report.all_reduces, report.rewritten_accumulations,
    )
    return report


def _edge_dims(node) -> List[int]:
    shape = node.meta.get(SHAPE) if isinstance(node, fx.Node) else None
    if not shape or isinstance(shape, list):
        return []
    return [k for k, d in enumerate(shape) if EDGES in getattr(d, "free_symbols", ())]


def _check_local_to_each_edge(node: fx.Node, name: str) -> None:
    """An op producing per-edge values must compute each edge from that edge alone (or
    from whole atom/structure tensors): a scan, sort or softmax along the edges, or a
    gather from an edge tensor along the edges, would read other ranks' edges."""
    src = node.args[0] if node.args else None
    dims = _edge_dims(src)
    if not dims:
        return
    rank = len(src.meta[SHAPE])
    if name in _ALONG_DIM:
        dim_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("dims", -1))
        along = dim_arg if isinstance(dim_arg, (list, tuple)) else [dim_arg]
        if name == "topk":
            along = [node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)]
        if any(isinstance(d, int) and d % rank in dims for d in along):
            raise GraphParallelError(
                f"{_where(node)} applies {name!r} along the edge dimension: on a shard it would see only "
                "this rank's edges. Graph parallelism needs per-edge ops to be local to each edge; set "
                "graph_parallel=1 for this model."
            )
    elif name in _GATHERS:
        dim_arg = node.args[1] if name in ("index_select", "gather") and len(node.args) > 1 else 0
        if isinstance(dim_arg, int) and dim_arg % rank in dims:
            raise GraphParallelError(
                f"{_where(node)} gathers from a per-edge tensor along the edges (e.g. the reverse of every "
                "edge): the edge it reads may live on another rank. Graph parallelism cannot shard this "
                "model's edges; set graph_parallel=1."
            )


def _flat_nodes(args) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg(args, lambda n: found.append(n))
    return found


def _accumulates(node: fx.Node) -> bool:
    if len(node.args) > 3:
        return bool(node.args[3])
    return bool(node.kwargs.get("accumulate", False))


def _insert_all_reduce(graph: fx.Graph, node: fx.Node, name: str, report: GraphParallelReport) -> None:
    users = list(node.users)
    dest = node.args[0] if name in _ACCUMULATING else None
    if dest is not None and not _is_zeros(dest):
        # x + sum_gp(op(zeros_like(x), ...)): the destination is counted once.
        with graph.inserting_before(node):
            zeros = graph.call_function(torch.ops.aten.zeros_like.default, (dest,))
        _copy_meta(zeros, dest if isinstance(dest, fx.Node) else node)
        _copy_labels(zeros, node)
        node.args = (zeros, *node.args[1:])
        report.rewritten_accumulations += 1
    with graph.inserting_after(node):
        reduced = graph.call_function(GP_ALL_REDUCE, (node,))
    _copy_meta(reduced, node)
    last = reduced
    if dest is not None and not _is_zeros(dest):
        with graph.inserting_after(reduced):
            last = graph.call_function(torch.ops.aten.add.Tensor, (dest, reduced))
        _copy_meta(last, node)
    for user in users:
        user.replace_input_with(node, last)
    phase = node.meta.get(PHASE, "F")
    report.all_reduces[phase] = report.all_reduces.get(phase, 0) + 1
    report.bytes[phase] = report.bytes.get(phase, sympy.Integer(0)) + nbytes(node)


def _copy_labels(dst: fx.Node, src: fx.Node) -> None:
    for key in (PHASE, MODULE, "forward_node", "is_loss"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
        else:
            dst.meta.pop(key, None)
