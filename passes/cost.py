"""Cost pass: symbolic FLOPs / bytes per node, and a calibrated time model.

The SymFold ILP partitioner balances pipeline stages over batches whose sizes it does
not know at compile time, so every cost here is a sympy expression in the named sizes
``atoms``, ``edges`` and ``structures`` (``meta["shape"]`` from `fake_inputs`), not a
number for one batch. `node_cost` gives FLOPs, bytes read + written and bytes of the
output by aten op; `calibrate` times each node of the joint graph on real batches and
fits, per op class, ``t ≈ c_flop·flops + c_byte·bytes + c_launch`` (non-negative least
squares; the per-node constant then refit per aten op, since dispatch overhead differs
by op), so a `CostModel` turns those expressions into seconds for any sizes. The fit
can be saved (`CostModel.to_json`) and reused on a later run on the same machine.

Op classes: ``matmul``, ``elementwise`` (also copies and fills: memory bound),
``index`` (gathers and scatters), ``reduction``, ``other`` (unknown ops, dense linear
algebra), ``view`` (aten ops that only change metadata: no FLOPs, no bytes, only
dispatch overhead) and ``meta`` (``getitem``, ``sym_size``, Python operators on sizes).
"""
from __future__ import annotations

import gc
import json
import logging
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import sympy
import torch
import torch.fx as fx

from .fake_inputs import DTYPE, NAMED_SYMBOLS, SHAPE, batch_sizes
from .labels import PHASE, PHASES

log = logging.getLogger(__name__)

Expr = sympy.Expr
Shape = Tuple[Expr, ...]
Sizes = Mapping[str, int]
GraphLike = Any  # fx.Graph, fx.GraphModule or anything with ``.gm`` (JointGraph)

ZERO = sympy.Integer(0)
ONE = sympy.Integer(1)
DEFAULT_ITEMSIZE = 4  # a node without dtype metadata is costed as float32

OP_CLASSES: Tuple[str, ...] = ("matmul", "elementwise", "index", "reduction", "other", "view", "meta")
FIT_CLASSES: Tuple[str, ...] = ("matmul", "elementwise", "index", "reduction", "other")

# -- op tables --------------------------------------------------------------------------

MATMUL_OPS = frozenset(
    {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot", "linear",
     "convolution", "_convolution", "outer", "ger"}
)

# Ops that only rewrite strides/sizes: their output aliases an input.
VIEW_OPS = frozenset(
    {"view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "permute", "transpose",
     "t", "numpy_T", "select", "slice", "narrow", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh",
     "as_strided", "unfold", "diagonal", "split", "split_with_sizes", "unbind", "chunk", "tensor_split",
     "movedim", "view_as", "view_as_real", "view_as_complex", "unflatten", "flatten", "swapaxes", "swapdims",
     "real", "imag", "conj", "_conj", "_neg_view"}
)

# Ops on sizes or tuples: no tensor work at all.
META_OPS = frozenset(
    {"getitem", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "sym_constrain_range",
     "sym_constrain_range_for_size", "_assert_scalar", "_local_scalar_dense", "item", "dim", "size"}
)

# Elementwise ops and FLOPs per output element (a rough per-op weight; the
# calibration absorbs the rest). Anything not listed in a table is "other".
ELEMENTWISE_FACTOR: Dict[str, int] = {
    # arithmetic / comparison / selection: one op per element
    **{name: 1 for name in (
        "add", "sub", "rsub", "mul", "div", "neg", "abs", "sign", "reciprocal", "square", "remainder",
        "fmod", "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "clip",
        "maximum", "minimum", "fmax", "fmin", "relu", "hardtanh", "where", "masked_fill", "eq", "ne",
        "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor",
        "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "isnan", "isinf", "isfinite",
        "nan_to_num", "heaviside", "threshold", "threshold_backward", "hardtanh_backward",
        "leaky_relu", "leaky_relu_backward", "relu6", "bucketize", "arange", "linspace",
    )},
    "addcmul": 2, "addcdiv": 2, "lerp": 2, "tanh_backward": 2, "copysign": 1,
    "sigmoid_backward": 3, "elu_backward": 3, "hardsigmoid": 3, "hardswish": 4,
    **{name: 4 for name in (
        "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "tan",
        "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sigmoid",
        "logit", "pow", "float_power", "erf", "erfc", "erfinv", "softplus", "silu", "elu", "celu", "selu",
        "logsigmoid", "xlogy", "sinc", "hypot",
    )},
    "_softmax": 5, "_log_softmax": 5, "_softmax_backward_data": 4, "_log_softmax_backward_data": 4,
    "softplus_backward": 6, "silu_backward": 6, "log_sigmoid_forward": 5, "log_sigmoid_backward": 6,
    "gelu": 8, "mish": 8, "gelu_backward": 12, "mish_backward": 12, "native_dropout": 2,
    "native_dropout_backward": 1, "bernoulli": 4, "rand_like": 4, "randn_like": 8, "uniform": 4,
}

# Copies, concatenations and scatter-of-a-slice backwards: bytes only.
COPY_OPS = frozenset(
    {"clone", "contiguous", "copy", "copy_", "_copy_from", "_to_copy", "to", "lift_fresh_copy",
     "detach_copy", "cat", "stack", "hstack", "vstack", "select_backward", "slice_backward",
     "select_scatter", "slice_scatter", "as_strided_scatter", "diagonal_backward", "diagonal_scatter",
     "expand_copy", "view_copy", "permute_copy", "t_copy", "transpose_copy", "repeat", "tile", "flip",
     "roll", "constant_pad_nd", "pad", "tril", "triu", "_unsafe_view_copy", "alias_copy"}
)

# Fills: write the output, read nothing.
FILL_OPS = frozenset(
    {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
     "fill", "fill_", "zero_", "zero", "scalar_tensor", "eye"}
)
# Allocations: no FLOPs, no traffic, but the output occupies memory.
ALLOC_OPS = frozenset({"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"})

REDUCTION_FACTOR: Dict[str, int] = {
    **{name: 1 for name in (
        "sum", "mean", "amax", "amin", "max", "min", "prod", "argmax", "argmin", "any", "all", "nansum",
        "nanmean", "count_nonzero", "cumsum", "cumprod", "cummax", "cummin", "aminmax", "_sum",
    )},
    **{name: 2 for name in ("var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm", "frobenius_norm")},
    "logsumexp": 5, "native_layer_norm": 5, "native_layer_norm_backward": 8, "native_batch_norm": 5,
    "_native_batch_norm_legit": 5, "_native_batch_norm_legit_functional": 5, "native_batch_norm_backward": 8,
    "native_group_norm": 5, "native_group_norm_backward": 8,
}

GATHER_OPS = frozenset({"index_select", "index", "_unsafe_index", "gather", "embedding", "take", "masked_select"})
SCATTER_OPS = frozenset(
    {"index_add", "index_add_", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "index_copy",
     "index_copy_", "index_fill", "index_fill_", "scatter", "scatter_", "scatter_add", "scatter_add_",
     "scatter_reduce", "scatter_reduce_", "embedding_dense_backward", "_unsafe_index_put", "masked_scatter",
     "index_reduce", "put"}
)
INDEX_OPS = GATHER_OPS | SCATTER_OPS

# Batched dense linear algebra on small matrices (cell determinants, inverses): ~n³ per matrix.
LINALG_OPS = frozenset(
    {"_linalg_det", "linalg_det", "det", "_linalg_slogdet", "linalg_inv_ex", "linalg_inv", "inverse",
     "_linalg_solve_ex", "linalg_solve", "linalg_lu_factor_ex", "linalg_lu", "linalg_cholesky_ex",
     "_linalg_eigh", "_linalg_svd", "linalg_qr", "triangular_solve", "linalg_solve_triangular"}
)


@dataclass
class NodeCost:
    """Work of one node as sympy expressions in atoms / edges / structures.

    ``flops``: arithmetic operations; ``bytes_moved``: bytes read + written (≈ memory
    traffic); ``out_bytes``: bytes newly allocated for the output (0 for views and
    in-place ops, which alias an input) — what stashing that output costs.
    """

    flops: Expr
    bytes_moved: Expr
    out_bytes: Expr
    op_class: str = "other"

    def evaluate(self, sizes: Sizes) -> Tuple[float, float, float]:
        subs = _subs(sizes)
        return tuple(_to_float(e.xreplace(subs)) for e in (self.flops, self.bytes_moved, self.out_bytes))


# -- shape helpers ----------------------------------------------------------------------


def op_name(node: fx.Node) -> str:
    """Base aten name of a node's target (``aten.mm.default`` → ``mm``)."""
    target = node.target
    name = getattr(target, "_opname", None)
    if name is None:
        name = getattr(target, "__name__", str(target))
    return name


def _shapes(node: Any) -> Optional[List[Shape]]:
    """Output shapes of a node (a list: several for multi-output ops), or None."""
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get(SHAPE)
    if shape is None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = tuple(_dim(s) for s in val.shape)
        elif isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
            shape = [tuple(_dim(s) for s in v.shape) for v in val]
        else:
            return None
    if isinstance(shape, list):
        return [tuple(sympy.sympify(d) for d in s) for s in shape]
    return [tuple(sympy.sympify(d) for d in shape)]


def _dim(size) -> Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _itemsizes(node: Any, n: int) -> List[int]:
    dtype = node.meta.get(DTYPE) if isinstance(node, fx.Node) else None
    if dtype is None and isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dtype = val.dtype
        elif isinstance(val, (list, tuple)):
            dtype = [v.dtype if isinstance(v, torch.Tensor) else None for v in val]
    if not isinstance(dtype, (list, tuple)):
        dtype = [dtype] * n
    sizes = [d.itemsize if isinstance(d, torch.dtype) else DEFAULT_ITEMSIZE for d in dtype][:n]
    return sizes + [DEFAULT_ITEMSIZE] * (n - len(sizes))


def _numel(shape: Shape) -> Expr:
    return sympy.Mul(*shape) if shape else ONE


def numel(node: Any) -> Expr:
    """Elements of a node's (first) output; 0 if it is not a tensor."""
    shapes = _shapes(node)
    return _numel(shapes[0]) if shapes else ZERO


def nbytes(node: Any) -> Expr:
    """Bytes of all of a node's tensor outputs (as if materialised)."""
    shapes = _shapes(node)
    if not shapes:
        return ZERO
    return sympy.Add(*[_numel(s) * isz for s, isz in zip(shapes, _itemsizes(node, len(shapes)))])


def _itemsize(node: Any) -> int:
    return _itemsizes(node, 1)[0]


def _tensor_args(node: fx.Node) -> List[fx.Node]:
    """Distinct input nodes that carry tensors, in argument order."""
    seen: Dict[fx.Node, None] = {}
    for arg in node.all_input_nodes:
        if _shapes(arg) is not None:
            seen.setdefault(arg, None)
    return list(seen)


def _read_bytes(arg: fx.Node) -> Expr:
    """Bytes an op reads from ``arg``: through a view chain, at most its base's size
    (an ``expand`` of a row is read as the row, a ``select`` as the slice)."""
    best = nbytes(arg)
    node = arg
    for _ in range(16):
        is_view = node.op == "call_function" and op_name(node) in VIEW_OPS
        if not (is_view and node.args and isinstance(node.args[0], fx.Node)):
            break
        node = node.args[0]
        base = nbytes(node)
        if base != ZERO:
            best = sympy.Min(best, base)
    return best


def _arg(node: fx.Node, i: int, key: str | None = None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key) if key else None


def _inputs_bytes(node: fx.Node) -> Expr:
    return sympy.Add(*[_read_bytes(a) for a in _tensor_args(node)]) if _tensor_args(node) else ZERO


def _index_bytes(node: fx.Node, skip: Sequence[Any]) -> Expr:
    """Bytes of the integer index tensors of an index op (every tensor arg not in ``skip``)."""
    return sympy.Add(ZERO, *[_read_bytes(a) for a in _tensor_args(node) if a not in skip])


# -- per-op cost --------------------------------------------------------------------------


def op_class(node: fx.Node) -> str:
    """Which fit class a node's time is predicted with."""
    if node.op != "call_function":
        return "meta"
    name = op_name(node)
    if getattr(node.target, "__module__", None) in ("_operator", "operator", "math") or name.startswith("sym_"):
        return "meta"  # operator.getitem, operator.mul on SymInts, torch.sym_max, ...
    if name in META_OPS:
        return "meta"
    if name in VIEW_OPS:
        return "view"
    if name in MATMUL_OPS:
        return "matmul"
    if name in INDEX_OPS:
        return "index"
    base = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
    if name in REDUCTION_FACTOR or base in REDUCTION_FACTOR:
        return "reduction"
    if (
        name in ELEMENTWISE_FACTOR
        or base in ELEMENTWISE_FACTOR
        or name in COPY_OPS
        or name in FILL_OPS
        or name in ALLOC_OPS
    ):
        return "elementwise"
    return "other"


_logged_unknown: set = set()


def node_cost(node: fx.Node) -> NodeCost:
    """FLOPs, bytes moved and output bytes of one node, by aten op (see module docstring)."""
    cls = op_class(node)
    if cls in ("view", "meta"):
        return NodeCost(ZERO, ZERO, ZERO, cls)
    name = op_name(node)
    inplace = name.endswith("_") and not name.startswith("_") or name in ("_index_put_impl_",)
    out_numel = numel(node)
    out_b = nbytes(node)
    alloc = ZERO if inplace else out_b
    if cls == "matmul":
        return NodeCost(_matmul_flops(node, name, out_numel), _inputs_bytes(node) + out_b, alloc, cls)
    if cls == "index":
        flops, moved = _index_cost(node, name, out_numel, inplace)
        return NodeCost(flops, moved, alloc, cls)
    if cls == "reduction":
        base = name.rstrip("_") if name.endswith("_") else name
        first = _arg(node, 0)
        n_in = numel(first) if isinstance(first, fx.Node) else out_numel
        factor = REDUCTION_FACTOR.get(name, REDUCTION_FACTOR.get(base, 1))
        return NodeCost(n_in * factor, _inputs_bytes(node) + out_b, alloc, cls)
    if cls == "elementwise":
        if name in ALLOC_OPS:
            return NodeCost(ZERO, ZERO, alloc, cls)
        if name in FILL_OPS:
            return NodeCost(ZERO, out_b, alloc, cls)
        if name in COPY_OPS:
            return NodeCost(ZERO, _inputs_bytes(node) + out_b, alloc, cls)
        base = name.rstrip("_") if inplace else name
        factor = ELEMENTWISE_FACTOR.get(name, ELEMENTWISE_FACTOR.get(base, 1))
        return NodeCost(out_numel * factor, _inputs_bytes(node) + out_b, alloc, cls)
    # other
    if name in LINALG_OPS:
        first = _arg(node, 0)
        shapes = _shapes(first)
        n = shapes[0][-1] if shapes and shapes[0] else ONE
        return NodeCost(numel(first) * n, _inputs_bytes(node) + out_b, alloc, cls)
    if name not in _logged_unknown:
        _logged_unknown.add(name)
        log.debug("cost: no rule for op %s (%s); costing it as numel(out) FLOPs", name, node.target)
    return NodeCost(out_numel, _inputs_bytes(node) + out_b, alloc, cls)


def _matmul_flops(node: fx.Node, name: str, out_numel: Expr) -> Expr:
    """2·M·N·K, written as 2·numel(out)·K (K: the contracted size of the first matrix)."""
    first_matrix = {"addmm": 1, "baddbmm": 1, "addbmm": 1, "addmv": 1}.get(name, 0)
    a = _arg(node, first_matrix)
    a_shapes = _shapes(a)
    if name in ("convolution", "_convolution"):
        w_shapes = _shapes(_arg(node, 1))
        transposed = bool(_arg(node, 6)) if len(node.args) > 6 else False
        if not w_shapes:
            return 2 * out_numel
        kernel = _numel(w_shapes[0][1:])
        return 2 * (numel(_arg(node, 0)) if transposed else out_numel) * kernel
    if name in ("outer", "ger"):
        return out_numel
    if not a_shapes or not a_shapes[0]:
        return 2 * out_numel
    k = a_shapes[0][-1]
    if name == "addbmm":  # the batch is summed away: out is (M, N)
        return 2 * a_shapes[0][0] * out_numel * k
    return 2 * out_numel * k


_BY_INDEX = ("scatter", "scatter_add", "scatter_reduce", "index_fill", "index_reduce")


def _index_cost(node: fx.Node, name: str, out_numel: Expr, inplace: bool) -> Tuple[Expr, Expr]:
    """(FLOPs, bytes) of gathers and scatters: FLOPs = elements moved."""
    isz = _itemsize(node)
    out_b = nbytes(node)
    if name in GATHER_OPS:  # read the gathered rows only, write the output
        data = _arg(node, 0)
        moved = out_numel
        return moved, moved * isz + out_b + _index_bytes(node, [data])
    # scatters: which argument holds the moved values
    if name == "embedding_dense_backward":
        src = _arg(node, 0)
        moved = numel(src)
        return moved, _read_bytes(src) + out_b + moved * isz + _index_bytes(node, [src])
    base = name.rstrip("_")
    if base in ("index_put", "_index_put_impl", "_unsafe_index_put"):
        src = _arg(node, 2)
    elif base in ("index_add", "index_copy"):
        src = _arg(node, 3)
    elif base in _BY_INDEX:
        src = _arg(node, 2)  # the index tensor: one element moved per index entry
    else:
        src = _arg(node, 2) if len(node.args) > 2 else None
    moved = numel(src) if isinstance(src, fx.Node) else out_numel
    target = _arg(node, 0)
    if inplace:
        copy = ZERO
    else:  # out-of-place: the target is copied into the output first
        copy = (_read_bytes(target) if isinstance(target, fx.Node) else ZERO) + out_b
    skip = [target] + ([src] if base not in _BY_INDEX else [])
    values = _arg(node, 3)
    if base in _BY_INDEX and isinstance(values, fx.Node):
        skip.append(values)  # the scattered values: read once per moved element below
    # read the source values, read-modify-write the target rows
    return moved, copy + 3 * moved * isz + _index_bytes(node, skip)


# -- whole graphs ------------------------------------------------------------------------


def _as_graph(graph: GraphLike) -> fx.Graph:
    if isinstance(graph, fx.Graph):
        return graph
    if isinstance(graph, fx.GraphModule):
        return graph.graph
    gm = getattr(graph, "gm", None)
    if isinstance(gm, fx.GraphModule):
        return gm.graph
    raise TypeError(f"expected an fx.Graph, GraphModule or JointGraph, got {type(graph).__name__}")


def _compute_nodes(graph: fx.Graph) -> List[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function"]


def graph_costs(graph: GraphLike) -> Dict[str, NodeCost]:
    """{node name: NodeCost} for every compute node."""
    return {n.name: node_cost(n) for n in _compute_nodes(_as_graph(graph))}


def _subs(sizes: Sizes) -> Dict[sympy.Symbol, sympy.Integer]:
    subs = {}
    for k, v in sizes.items():
        sym = NAMED_SYMBOLS.get(k, k) if isinstance(k, str) else k
        if isinstance(sym, str):
            sym = sympy.Symbol(sym, integer=True, positive=True)
        subs[sym] = sympy.Integer(int(v))
    return subs


def _to_float(expr: Expr) -> float:
    expr = sympy.sympify(expr)
    if expr.free_symbols:
        raise KeyError(f"sizes do not define {sorted(map(str, expr.free_symbols))} (needed by {expr})")
    return float(expr)


@dataclass
class _CostTable:
    """Every compute node's costs, compiled once to one numeric function of the sizes."""

    names: List[str]
    phases: List[str]
    classes: List[str]
    ops: List[str]
    symbols: List[sympy.Symbol]
    fn: Callable[..., Any]
    key: Tuple[str, ...]

    def evaluate(self, sizes: Sizes) -> np.ndarray:
        """(3, nodes) array: flops, bytes moved, out bytes."""
        subs = _subs(sizes)
        missing = [s for s in self.symbols if s not in subs]
        if missing:
            raise KeyError(f"sizes {dict(sizes)} do not define {sorted(map(str, missing))}")
        values = self.fn(*[int(subs[s]) for s in self.symbols])
        return np.array([[float(v) for v in row] for row in values], dtype=np.float64).reshape(3, len(self.names))


_tables: "weakref.WeakKeyDictionary[fx.Graph, _CostTable]" = weakref.WeakKeyDictionary()


def _cost_table(graph: GraphLike) -> _CostTable:
    g = _as_graph(graph)
    nodes = _compute_nodes(g)
    key = tuple(n.name for n in nodes)
    table = _tables.get(g)
    if table is not None and table.key == key:
        return table
    costs = [node_cost(n) for n in nodes]
    rows = [[c.flops for c in costs], [c.bytes_moved for c in costs], [c.out_bytes for c in costs]]
    symbols = sorted({s for row in rows for e in row for s in e.free_symbols}, key=str)
    fn = sympy.lambdify(symbols, rows, modules=[{"Min": min, "Max": max}, "math"])
    table = _CostTable(
        names=list(key),
        phases=[str(n.meta.get(PHASE, "unlabelled")) for n in nodes],
        classes=[c.op_class for c in costs],
        ops=[op_name(n) for n in nodes],
        symbols=symbols,
        fn=fn,
        key=key,
    )
    _tables[g] = table
    return table


def phase_totals(graph: GraphLike, sizes: Sizes) -> Dict[str, Dict[str, float]]:
    """{phase: {"flops", "bytes"}} for concrete sizes (every phase of `PHASES` present)."""
    table = _cost_table(graph)
    values = table.evaluate(sizes)
    out: Dict[str, Dict[str, float]] = {p: {"flops": 0.0, "bytes": 0.0} for p in PHASES}
    for i, phase in enumerate(table.phases):
        slot = out.setdefault(phase, {"flops": 0.0, "bytes": 0.0})
        slot["flops"] += float(values[0, i])
        slot["bytes"] += float(values[1, i])
    return out


# -- memory ---------------------------------------------------------------------------------


def param_bytes(joint_graph: Any, params: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the parameters the joint graph takes (one copy; gradients are as many more)."""
    names = getattr(joint_graph, "param_names", None) or list(params)
    return int(sum(params[n].numel() * params[n].element_size() for n in names))


def activation_bytes(graph: GraphLike, nodes: Iterable[Union[fx.Node, str]], sizes: Optional[Sizes] = None):
    """Sum of ``out_bytes`` of ``nodes`` (nodes or names): what stashing them costs.

    Views and in-place results count 0 (they alias); a placeholder counts its full
    size. Symbolic (a sympy expression) without ``sizes``; a float with them.
    """
    g = _as_graph(graph)
    by_name = {n.name: n for n in g.nodes}
    total = ZERO
    for n in nodes:
        node = by_name[n] if isinstance(n, str) else n
        if node.op == "call_function":
            total += node_cost(node).out_bytes
        elif node.op == "placeholder":
            total += nbytes(node)
    if sizes is None:
        return total
    return _to_float(sympy.sympify(total).xreplace(_subs(sizes)))


# -- calibration ------------------------------------------------------------------------------


class _TimingInterpreter(fx.Interpreter):
    """Runs the graph and records the wall time of every call_function node."""

    def __init__(self, gm: fx.GraphModule, cuda: bool) -> None:
        super().__init__(gm)
        self.cuda = cuda
        self.times: Dict[str, float] = {}

    def run_node(self, n: fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = n.target(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.times[n.name] = time.perf_counter() - t0
        return out


def _size_key(sizes: Sizes) -> str:
    return ",".join(f"{k}={int(v)}" for k, v in sorted(sizes.items()))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b||, x >= 0 (columns rescaled for conditioning)."""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a_s = a / scale
    try:
        from scipy.optimize import nnls  # optional: scipy is not a dependency

        x, _ = nnls(a_s, b)
    except ImportError:
        x = _nnls_enumerate(a_s, b)
    return x / scale


def _nnls_enumerate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact NNLS for a few columns: best feasible unconstrained fit over column subsets."""
    k = a.shape[1]
    best, best_res = np.zeros(k), float(np.sum(b * b))
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if np.any(sol < 0):
            continue
        x = np.zeros(k)
        x[cols] = sol
        res = float(np.sum((a @ x - b) ** 2))
        if res < best_res:
            best, best_res = x, res
    return best


@dataclass
class CostModel:
    """Per-class time coefficients ``(c_flop, c_byte, c_launch)`` in seconds per FLOP,
    per byte and per node; ``"default"`` serves classes the calibration never saw.

    ``launch``: per aten op, the per-node constant that replaces its class's
    ``c_launch`` — dispatch overhead differs by op (``t`` takes no size list, ``view``
    does), and the per-node constant is most of a small node's time.
    ``measured``: {sizes key: {node name: median seconds}} of the calibration runs;
    ``fit_report``: per calibration batch, measured vs predicted total per phase.
    """

    coeffs: Dict[str, Tuple[float, float, float]]
    launch: Dict[str, float] = field(default_factory=dict)
    measured: Dict[str, Dict[str, float]] = field(default_factory=dict)
    fit_report: List[Dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    info: Dict[str, Any] = field(default_factory=dict)

    def _coeff(self, cls: str) -> Tuple[float, float, float]:
        return self.coeffs.get(cls) or self.coeffs.get("default") or (0.0, 0.0, 0.0)

    def _row(self, cls: str, op: str) -> Tuple[float, float, float]:
        c = self._coeff(cls)
        return (c[0], c[1], self.launch.get(op, c[2]))

    def node_time(self, node: fx.Node, sizes: Sizes) -> float:
        """Predicted seconds of one node at these sizes."""
        cost = node_cost(node)
        flops, moved, _ = cost.evaluate(sizes)
        c = self._row(cost.op_class, op_name(node))
        return c[0] * flops + c[1] * moved + c[2]

    def _time_vector(self, table: _CostTable, values: np.ndarray) -> np.ndarray:
        coef = np.array([self._row(c, o) for c, o in zip(table.classes, table.ops)], dtype=np.float64).reshape(-1, 3)
        return coef[:, 0] * values[0] + coef[:, 1] * values[1] + coef[:, 2]

    def times(self, graph: GraphLike, sizes: Sizes) -> Dict[str, float]:
        """{node name: predicted seconds} for every compute node."""
        table = _cost_table(graph)
        t = self._time_vector(table, table.evaluate(sizes))
        return dict(zip(table.names, t.tolist()))

    def phase_times(self, graph: GraphLike, sizes: Sizes) -> Dict[str, float]:
        """{phase: predicted seconds} (every phase of `PHASES` present)."""
        table = _cost_table(graph)
        t = self._time_vector(table, table.evaluate(sizes))
        out = {p: 0.0 for p in PHASES}
        for phase, v in zip(table.phases, t.tolist()):
            out[phase] = out.get(phase, 0.0) + v
        return out

    @property
    def max_fit_error(self) -> float:
        """Largest |predicted - measured| / measured over calibration batches and phases."""
        rows = [row for rep in self.fit_report for row in rep["phases"].values()]
        return max((abs(row["rel_error"]) for row in rows if row["measured"] > 0), default=0.0)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "device": self.device,
                "coeffs": {k: list(v) for k, v in self.coeffs.items()},
                "launch": self.launch,
                "measured": self.measured,
                "fit_report": self.fit_report,
                "info": self.info,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        data = json.loads(text)
        if data.get("version") != 1:
            raise ValueError(f"unknown cost model version {data.get('version')!r}")
        return cls(
            coeffs={k: tuple(float(x) for x in v) for k, v in data["coeffs"].items()},
            launch={k: float(v) for k, v in data.get("launch", {}).items()},
            measured=data.get("measured", {}),
            fit_report=data.get("fit_report", []),
            device=data.get("device", "cpu"),
            info=data.get("info", {}),
        )

    def summary(self) -> str:
        lines = [f"cost model on {self.device}:"]
        for cls_name, (cf, cb, cl) in sorted(self.coeffs.items()):
            lines.append(f"  {cls_name:11s} {cf * 1e12:9.3f} ps/flop {cb * 1e12:9.3f} ps/byte {cl * 1e6:8.2f} us/node")
        for rep in self.fit_report:
            parts = [
                f"{p} {row['measured'] * 1e3:.2f}/{row['predicted'] * 1e3:.2f} ms ({row['rel_error']:+.0%})"
                for p, row in rep["phases"].items()
            ]
            lines.append(f"  {rep['sizes']}: measured/predicted " + ", ".join(parts))
        return "\n".join(lines)


def measure_node_times(
    joint_graph: Any,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    device: Union[str, torch.device] = "cpu",
    repeats: int = 3,
) -> List[Dict[str, float]]:
    """Per batch, {node name: median seconds} of running ``joint_graph.gm`` on it.

    Repeats are interleaved across batches (batch 1, batch 2, batch 1, ...) so that a
    change in machine load between runs spreads over all batches instead of skewing
    one of them; a warm-up run per batch comes first.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    p = {k: v.detach().to(dev) for k, v in params.items()}
    b = {k: v.detach().to(dev) for k, v in buffers.items()}
    flats = [joint_graph.flat_inputs(p, b, batch.to(dev)) for batch in batches]
    runs: List[List[Dict[str, float]]] = [[] for _ in batches]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside a timed op would land on a random node
    try:
        with torch.no_grad():
            for r in range(max(1, repeats) + 1):
                for i, flat in enumerate(flats):
                    interp = _TimingInterpreter(joint_graph.gm, cuda)
                    interp.run(*flat)
                    if r > 0:  # the first run warms up allocator and kernels
                        runs[i].append(interp.times)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [{name: statistics.median(run[name] for run in rs) for name in rs[0]} for rs in runs]


def calibrate(
    joint_graph: Any,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    device: Union[str, torch.device] = "cpu",
    repeats: int = 3,
) -> CostModel:
    """Time every node of the joint graph on ``batches`` and fit a `CostModel`.

    Batches of different sizes let the fit tell the per-FLOP / per-byte slopes from the
    per-node constant. Per class, ``t = c_flop·flops + c_byte·bytes + c_launch`` is fit
    by non-negative least squares on absolute times (so that sums, which the
    partitioner balances, come out unbiased); then each aten op gets its own per-node
    constant (`CostModel.launch`). Calibrate on batches as large as training uses: the
    per-FLOP and per-byte slopes are only as good as the sizes they were fit on.
    """
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    graph = joint_graph.gm.graph
    table = _cost_table(graph)
    fields = list(joint_graph.batch_fields) + list(joint_graph.target_fields)
    measured: Dict[str, Dict[str, float]] = {}
    rows: List[Tuple[str, np.ndarray, np.ndarray]] = []  # (key, values (3, n), times (n,))
    all_sizes: List[Dict[str, int]] = []
    for batch in batches:
        sizes = batch_sizes(fields, [getattr(batch, f) for f in fields])
        bad = joint_graph.guards.violated(sizes) if getattr(joint_graph, "guards", None) else []
        if bad:
            raise ValueError(f"batch with sizes {sizes} is outside the joint graph's guards: {bad}")
        all_sizes.append(sizes)
    for sizes, times in zip(all_sizes, measure_node_times(joint_graph, params, buffers, batches, device, repeats)):
        key = _size_key(sizes)
        measured[key] = times  # two batches of equal sizes: the later one's times are kept
        rows.append((key, table.evaluate(sizes), np.array([times[n] for n in table.names])))

    classes = np.array(table.classes)
    coeffs: Dict[str, Tuple[float, float, float]] = {}

    def fit(mask: np.ndarray) -> Tuple[float, float, float]:
        a = np.concatenate([np.stack([v[0][mask], v[1][mask], np.ones(mask.sum())], axis=1) for _, v, _ in rows])
        y = np.concatenate([t[mask] for _, _, t in rows])
        return tuple(float(x) for x in _nnls(a, y))

    for cls_name in OP_CLASSES:
        mask = classes == cls_name
        if mask.any():
            coeffs[cls_name] = fit(mask) if cls_name not in ("view", "meta") else (0.0, 0.0, _mean_time(rows, mask))
    work = np.isin(classes, FIT_CLASSES)
    coeffs["default"] = fit(work if work.any() else np.ones(len(classes), dtype=bool))
    launch = _op_launch(rows, table, coeffs)

    model = CostModel(
        coeffs=coeffs,
        launch=launch,
        measured=measured,
        device=str(torch.device(device)),
        info={"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats, "sizes": all_sizes},
    )
    for sizes, (key, _, t) in zip(all_sizes, rows):
        predicted = model.phase_times(graph, sizes)
        phases = {}
        for phase in predicted:
            meas = float(sum(t[i] for i, p in enumerate(table.phases) if p == phase))
            phases[phase] = {
                "measured": meas,
                "predicted": predicted[phase],
                "rel_error": (predicted[phase] - meas) / meas if meas > 0 else 0.0,
            }
        model.fit_report.append({"sizes": key, "phases": phases})
    log.info("%s", model.summary())
    return model


def _op_launch(rows, table: _CostTable, coeffs: Mapping[str, Tuple[float, float, float]]) -> Dict[str, float]:
    """Per aten op: its class's ``c_launch`` plus the mean residual of that op's nodes
    (the slopes stay per class; only the per-node constant is refit, kept >= 0)."""
    ops = np.array(table.ops)
    classes = np.array(table.classes)
    launch: Dict[str, float] = {}
    for op in sorted(set(table.ops)):
        mask = ops == op
        cls = str(classes[mask][0])
        c_flop, c_byte, c_launch = coeffs.get(cls, coeffs["default"])
        resid = np.concatenate([t[mask] - (c_flop * v[0][mask] + c_byte * v[1][mask]) for _, v, t in rows])
        launch[op] = max(0.0, float(resid.mean()))
    return launch


def _mean_time(rows, mask: np.ndarray) -> float:
    """Metadata ops carry no work: their time is the mean dispatch overhead."""
    return float(np.mean(np.concatenate([t[mask] for _, _, t in rows])))
