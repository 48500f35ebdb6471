"""The ``januspipe`` torch.compile backend.

Dynamo graph-breaks at ``torch.autograd.grad``, so this backend sees the energy part of
the model as one graph and the code after the break (``-grad`` etc.) as others. Each
graph whose inputs need gradients is wrapped in an autograd.Function whose backward
runs an *explicit* gradient graph: the vector-Jacobian product of the graph, traced to
aten with symbolic sizes. The model's ``torch.autograd.grad(E, positions,
create_graph=True)`` therefore runs our graph, and because that graph is made of
ordinary differentiable aten ops, ``loss.backward()`` (the double backward) runs
through it too. Stock `aot_autograd` backends refuse this ("does not support double
backward").

The backward recomputes the energy forward inside the vjp graph instead of saving
activations: simple and exact, at the cost of one extra forward. Models Dynamo cannot
trace (e3nn-based ones) use `janus_compile.compile` instead, which captures the whole
step without Dynamo.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from .errors import JanusError
from .options import JanusOptions
from .passes.fake_inputs import SizeGuards, new_fake_mode
from .passes.index_add import index_put_to_index_add
from .passes.tracing import LabelState, labelling, remove_autograd_detaches
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

log = logging.getLogger(__name__)


def _fake_like_dynamo(mode, value, dynamic_dims: Sequence[int]):
    dims = [DimDynamic.DYNAMIC if d in dynamic_dims else DimDynamic.STATIC for d in range(value.dim())]
    ctx = StatelessSymbolicContext(dynamic_sizes=dims, constraint_sizes=[None] * value.dim())
    fake = mode.from_tensor(value, symbolic_context=ctx)
    return fake


class _VjpGraphs:
    """Explicit vjp graphs of one Dynamo graph, re-traced only when size guards fail."""

    def __init__(
        self, gm: fx.GraphModule, dynamic: Dict[int, List[int]], symint_args: List[int], diff_idx: List[int]
    ) -> None:
        self.gm = gm
        self.dynamic = dynamic  # input index -> its dynamic dims (from Dynamo's example inputs)
        self.symint_args = symint_args  # inputs Dynamo passes as symbolic ints (sizes)
        self.diff_idx = diff_idx
        self.cache: List[tuple] = []

    def _sizes(self, args: Sequence[Any]) -> Dict[str, int]:
        sizes = {f"a{i}_{d}": int(args[i].shape[d]) for i, dims in self.dynamic.items() for d in dims}
        sizes.update({f"a{i}": int(args[i]) for i in self.symint_args})
        return sizes

    def get(self, args: Sequence[Any], grad_outs: Sequence[torch.Tensor]) -> fx.GraphModule:
        sizes = self._sizes(args)
        for guards, graph in self.cache:
            if not guards.violated(sizes):
                return graph
        graph, guards = self._trace(args, grad_outs)
        self.cache.append((guards, graph))
        return graph

    def _trace(self, args, grad_outs):
        mode = new_fake_mode()
        symbols: Dict[str, List[sympy.Symbol]] = {}
        fakes = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                dims = self.dynamic.get(i, [])
                fake = _fake_like_dynamo(mode, a.detach(), dims)
                for d in dims:
                    symbols[f"a{i}_{d}"] = [fake.shape[d].node.expr]
                fakes.append(fake)
            elif i in self.symint_args:
                sym = mode.shape_env.create_unspecified_symint_and_symbol(
                    int(a), ConstantSource(f"a{i}"), DimDynamic.DYNAMIC
                )
                symbols[f"a{i}"] = [sym.node.expr]
                fakes.append(sym)
            else:
                fakes.append(a)
        fake_grads = [mode.from_tensor(g) if isinstance(g, torch.Tensor) else g for g in grad_outs]
        gm, diff_idx = self.gm, self.diff_idx
        n = len(fakes)

        def vjp_graph(*flat):
            inputs, grads = list(flat[:n]), list(flat[n:])

            def energy(*diff):
                full = list(inputs)
                for k, i in enumerate(diff_idx):
                    full[i] = diff[k]
                out = gm(*full)
                return tuple(out) if isinstance(out, (list, tuple)) else (out,)

            state = LabelState(phase="G", backward_phase="G")
            with labelling(state, None):
                _, pullback = torch.func.vjp(energy, *[inputs[i] for i in diff_idx])
                return pullback(tuple(grads))

        with mode:
            traced = make_fx(vjp_graph, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*fakes, *fake_grads)
        remove_autograd_detaches(traced)
        index_put_to_index_add(traced)
        guards = SizeGuards.from_trace(mode.shape_env, symbols)
        log.info("januspipe backend: traced explicit gradient graph (%d nodes)", len(traced.graph.nodes))
        return traced, guards


class _ExplicitGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: "_GraphRunner", *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ctx.runner = runner
        ctx.layout = [isinstance(a, torch.Tensor) for a in args]
        ctx.others = [a for a in args if not isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        out = runner.gm(*args)
        outs = tuple(out) if isinstance(out, (list, tuple)) else (out,)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        ctx.n_outs = len(outs)
        ctx.was_tuple = isinstance(out, (list, tuple))
        return outs

    @staticmethod
    @torch.compiler.disable
    def backward(ctx, *grad_outs):
        saved = iter(ctx.saved_tensors)
        others = iter(ctx.others)
        args = [next(saved) if is_t else next(others) for is_t in ctx.layout]
        runner: _GraphRunner = ctx.runner
        graph = runner.vjp.get(args, grad_outs)
        grads = graph(*args, *grad_outs)
        result: List[Optional[torch.Tensor]] = [None] * len(args)
        for k, i in enumerate(runner.vjp.diff_idx):
            result[i] = grads[k]
        return (None, *result)


class _GraphRunner:
    """What the backend returns for one Dynamo graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
        self.gm = gm
        dynamic: Dict[int, List[int]] = {}
        diff_idx: List[int] = []
        # Dynamo hands backends real example tensors; the symbolic view of each input
        # (which sizes it let vary) is in the placeholders' ``example_value``.
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        symbolic = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
        symint_args = [
            i for i, (ex, sym) in enumerate(zip(example_inputs, symbolic))
            if isinstance(ex, torch.SymInt) or isinstance(sym, torch.SymInt)
        ]
        for i, (ex, sym) in enumerate(zip(example_inputs, symbolic)):
            if isinstance(ex, torch.Tensor):
                shape = sym.shape if isinstance(sym, torch.Tensor) else ex.shape
                dims = [d for d, s in enumerate(shape) if isinstance(s, torch.SymInt)]
                if dims:
                    dynamic[i] = dims
                if ex.requires_grad and ex.is_floating_point():
                    diff_idx.append(i)
        self.vjp = _VjpGraphs(gm, dynamic, symint_args, diff_idx)

    def __call__(self, *args):
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(args[i], torch.Tensor) and args[i].requires_grad for i in self.vjp.diff_idx
        )
        if not needs_grad:
            return self.gm(*args)
        outs = _ExplicitGrad.apply(self, *args)
        return list(outs)


def januspipe_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Mapping[str, Any]] = None):
    """torch.compile backend entry point (also registered as the ``januspipe`` entry point)."""
    opts = JanusOptions.from_mapping(options)
    if opts.pipelined or opts.world_size > 1:
        raise JanusError(
            "the torch.compile path sees the model in fragments (Dynamo breaks the graph at "
            "torch.autograd.grad), so it cannot partition it into pipeline stages or shard it; use "
            "janus_compile.PipelineTrainer(model, example_batch, stages=..., data_parallel=..., "
            "graph_parallel=...) instead"
        )
    return _GraphRunner(gm, example_inputs)


def register() -> None:
    """Make ``backend="januspipe"`` resolve even without the installed entry point.

    When the package is installed, torch finds the backend through the
    ``torch_dynamo_backends`` entry point and registers it itself; registering here
    too would make torch's registry fail with a duplicate name.
    """
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    from . import entry_point_installed

    if not entry_point_installed() and "januspipe" not in _COMPILER_FNS:
        register_backend(name="januspipe")(januspipe_backend)
