"""Fake inputs with exactly the symbolic sizes we want, and guards to check them.

Only the leading axis of each batch field is symbolic (atoms, edges or structures);
parameters and the small axes (3, 2) stay static. Duck sizing and the 0/1
specialisation are off so that, say, a batch with as many atoms as edges does not
yield a graph that silently assumes they are equal. Whatever the trace had to assume
about the sizes is kept as guards and checked before each run (`SizeGuards`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

# Which semantic size the leading axis of a batch field is.
FIELD_DIM: Dict[str, Tuple[int, str]] = {
    "positions": (0, "atoms"),
    "numbers": (0, "atoms"),
    "batch": (0, "atoms"),
    "forces": (0, "atoms"),
    "edge_index": (1, "edges"),
    "shifts": (0, "edges"),
    "cell": (0, "structures"),
    "pbc": (0, "structures"),
    "energy": (0, "structures"),
    "stress": (0, "structures"),
}
SIZE_NAMES = ("atoms", "edges", "structures")


def new_fake_mode() -> FakeTensorMode:
    shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    return FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)


def fake_input(mode: FakeTensorMode, t: torch.Tensor, dynamic_dim: int | None) -> torch.Tensor:
    dims = [DimDynamic.STATIC] * t.dim()
    if dynamic_dim is not None:
        dims[dynamic_dim] = DimDynamic.DYNAMIC
    ctx = StatelessSymbolicContext(dynamic_sizes=dims, constraint_sizes=[None] * t.dim())
    fake = mode.from_tensor(t, symbolic_context=ctx)
    if t.requires_grad and not fake.requires_grad:
        fake.requires_grad_(True)
    return fake


@dataclass
class SizeGuards:
    """What a trace assumed about the symbolic sizes, checkable on real batches.

    ``symbols`` maps each semantic size to its sympy symbol (after the trace's own
    unifications); ``guards`` are sympy booleans over those symbols.
    """

    symbols: Dict[str, sympy.Expr]
    guards: List[sympy.Basic]

    @staticmethod
    def from_trace(shape_env: ShapeEnv, input_symbols: Mapping[str, List[sympy.Symbol]]) -> "SizeGuards":
        symbols: Dict[str, sympy.Expr] = {}
        subs: Dict[sympy.Symbol, sympy.Expr] = {}
        for size, syms in input_symbols.items():
            if not syms:
                continue
            canonical = shape_env.replace(syms[0])
            symbols[size] = canonical
        # Express every guard in terms of the canonical symbols.
        for size, syms in input_symbols.items():
            for s in syms:
                subs[s] = shape_env.replace(s)
        guards = []
        for g in shape_env.guards:
            expr = shape_env.replace(g.expr).xreplace(subs)
            if expr is sympy.true:
                continue
            guards.append(expr)
        # A size the trace fixed to a number is a guard too.
        for size, expr in symbols.items():
            if expr.is_number:
                guards.append(sympy.Eq(sympy.Symbol(f"__{size}"), expr))
        return SizeGuards(symbols=symbols, guards=guards)

    @property
    def specialised(self) -> Dict[str, int]:
        return {k: int(v) for k, v in self.symbols.items() if v.is_number}

    def violated(self, sizes: Mapping[str, int]) -> List[str]:
        """The guards that fail for these sizes (empty: the graph is valid for them)."""
        env = {}
        for size, expr in self.symbols.items():
            if size not in sizes:
                continue
            if expr.is_number:
                env[sympy.Symbol(f"__{size}")] = sizes[size]
            elif isinstance(expr, sympy.Symbol):
                env[expr] = sizes[size]
        bad = []
        for g in self.guards:
            try:
                ok = bool(g.xreplace({k: sympy.Integer(v) for k, v in env.items()}))
            except TypeError:
                ok = True  # guard over symbols this batch does not define
            if not ok:
                bad.append(str(g))
        return bad


def batch_sizes(fields: Sequence[str], tensors: Sequence[torch.Tensor]) -> Dict[str, int]:
    sizes: Dict[str, int] = {}
    for name, t in zip(fields, tensors):
        if name in FIELD_DIM:
            dim, size = FIELD_DIM[name]
            sizes.setdefault(size, int(t.shape[dim]))
    return sizes


SHAPE = "shape"  # node.meta key: tuple of sympy expressions in atoms/edges/structures
DTYPE = "dtype"
NAMED_SYMBOLS = {name: sympy.Symbol(name, integer=True, positive=True) for name in SIZE_NAMES}


def annotate_named_shapes(graph, shape_env: ShapeEnv, guards: SizeGuards) -> None:
    """Write every tensor node's shape as sympy expressions of atoms, edges, structures.

    Later passes (cost model, partition tables) read ``meta["shape"]`` and
    ``meta["dtype"]`` instead of the trace's internal symbols.
    """
    rename = {v: NAMED_SYMBOLS[k] for k, v in guards.symbols.items() if isinstance(v, sympy.Symbol)}

    def named(size) -> sympy.Expr:
        if isinstance(size, torch.SymInt):
            return shape_env.replace(size.node.expr).xreplace(rename)
        return sympy.Integer(int(size))

    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta[SHAPE] = tuple(named(s) for s in val.shape)
            node.meta[DTYPE] = val.dtype
        elif isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
            node.meta[SHAPE] = [tuple(named(s) for s in v.shape) for v in val]
            node.meta[DTYPE] = [v.dtype for v in val]
