"""Capture pass: a conservative MLIP → one explicit aten graph of energy and forces.

The model runs once under symbolic `make_fx`; its own ``torch.autograd.grad`` call is
recorded op by op, so forces (and stress) become ordinary graph nodes (phase G) after
the energy nodes (phase F). Parameters, buffers and batch fields are graph inputs;
atoms, edges and structures are symbolic sizes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..data.batch import REQUIRED_FIELDS, AtomsBatch
from ..errors import (
    CaptureError,
    DataDependentControlFlowError,
    NoDoubleBackwardError,
    NotConservativeError,
    ScriptedModuleError,
)
from .fake_inputs import FIELD_DIM, SizeGuards, annotate_named_shapes, batch_sizes, fake_input, new_fake_mode
from .index_add import index_put_to_index_add
from .labels import MODULE, PHASE
from .tracing import (
    GRAD_ENABLED,
    GRAD_FN,
    LabelState,
    downstream_of_backward_is_backward,
    labelling,
    link_backward_nodes,
    remove_autograd_detaches,
)

log = logging.getLogger(__name__)


@dataclass
class ForceGraph:
    """The captured energy+force graph and how to call it.

    Inputs, in order: parameters (``param_names``), buffers (``buffer_names``), batch
    fields (``batch_fields``). Outputs: the model's output dict values in
    ``output_names`` order.
    """

    gm: fx.GraphModule
    param_names: List[str]
    buffer_names: List[str]
    batch_fields: List[str]
    output_names: List[str]
    guards: SizeGuards

    def flat_inputs(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], batch: AtomsBatch
    ) -> List[torch.Tensor]:
        return (
            [params[n] for n in self.param_names]
            + [buffers[n] for n in self.buffer_names]
            + [getattr(batch, f) for f in self.batch_fields]
        )

    def __call__(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], batch: AtomsBatch
    ) -> Dict[str, torch.Tensor]:
        outs = self.gm(*self.flat_inputs(params, buffers, batch))
        return dict(zip(self.output_names, outs))


def _check_not_scripted(model: torch.nn.Module) -> None:
    scripted = [name or "<root>" for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ScriptedModuleError(
            f"submodule(s) {scripted[:5]} are TorchScript modules, which cannot be traced "
            "symbolically. Build the model without scripting: for e3nn, call "
            "`e3nn.set_optimization_defaults(jit_script_fx=False)` before constructing it; "
            "otherwise pass the plain nn.Module instead of torch.jit.script(module)."
        )


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and this package."""
    import traceback

    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        f = frame.filename.replace("\\", "/")
        if "/torch/" in f or "/janus_compile/" in f or "/passes/" in f or "/sympy/" in f:
            continue
        return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return "<unknown location>"


def _translate_error(exc: Exception) -> Optional[CaptureError]:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    text = str(exc)
    where = _user_frame(exc)
    if isinstance(exc, (DataDependentOutputException, GuardOnDataDependentSymNode)) or (
        "data-dependent" in text.lower() or "data dependent" in text.lower()
    ):
        return DataDependentControlFlowError(
            f"the model reads a tensor's value in Python at {where} (data-dependent control "
            "flow or `.item()`), which a captured graph cannot represent: replace the `if`/loop "
            "on tensor values by tensor ops (torch.where, masking) or move it out of forward()."
        )
    if isinstance(exc, DynamicOutputShapeException):
        return DataDependentControlFlowError(
            f"an op at {where} has an output size that depends on tensor values ({text.splitlines()[0]}); "
            "compute it outside the model (for example in the neighbour list) or use a fixed-size op."
        )
    if "appears to not have been used in the graph" in text or "does not require grad" in text:
        return NotConservativeError(
            f"the energy does not depend on the positions ({text.splitlines()[0]}) at {where}: "
            "forces = -dE/dR need an energy computed from batch.positions (through edge vectors "
            "r_ij); check that the model uses positions and does not detach them."
        )
    return None


def _batch_fields(batch: AtomsBatch, need: Sequence[str]) -> List[str]:
    batch.validate(need=tuple(need))
    return [f for f in REQUIRED_FIELDS if getattr(batch, f) is not None]


def _rename_placeholders(gm: fx.GraphModule, names: Sequence[str]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, names):
        clean = re.sub(r"\W", "_", name)
        node.target = clean
        node._rename(clean)
        node.meta[PHASE] = None
        node.meta[MODULE] = ""
    gm.recompile()


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(n.all_input_nodes)
    return False


def capture_force_graph(
    model: torch.nn.Module,
    example_batch: AtomsBatch,
    required_fields: Sequence[str] = REQUIRED_FIELDS,
) -> ForceGraph:
    """Trace ``model(batch)`` (a dict with "energy" and "forces") into a `ForceGraph`."""
    _check_not_scripted(model)
    fields = _batch_fields(example_batch, required_fields)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    param_names, buffer_names = list(params), list(buffers)

    mode = new_fake_mode()
    flat_real = [params[n] for n in param_names] + [buffers[n] for n in buffer_names]
    fakes = [fake_input(mode, t.detach(), None) for t in flat_real]
    input_symbols: Dict[str, List[sympy.Symbol]] = {s: [] for s in ("atoms", "edges", "structures")}
    for f in fields:
        dim, size = FIELD_DIM[f]
        fake = fake_input(mode, getattr(example_batch, f), dim)
        input_symbols[size].append(fake.shape[dim].node.expr)
        fakes.append(fake)

    n_state = len(param_names) + len(buffer_names)
    state = LabelState(phase="F", backward_phase="G")
    output_names: List[str] = []

    def run(*flat: torch.Tensor):
        p = dict(zip(param_names, flat[: len(param_names)]))
        b = dict(zip(buffer_names, flat[len(param_names) : n_state]))
        batch = AtomsBatch(**dict(zip(fields, flat[n_state:])))
        with labelling(state, model):
            out = torch.func.functional_call(model, {**p, **b}, (batch,), strict=False)
        if not isinstance(out, Mapping) or "energy" not in out or "forces" not in out:
            raise CaptureError(
                "the model must return a dict with at least 'energy' [S] and 'forces' [N, 3] "
                f"(got {type(out).__name__}{' with keys ' + str(list(out)) if isinstance(out, Mapping) else ''})"
            )
        output_names[:] = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        return tuple(out[k] for k in output_names)

    try:
        with mode:
            gm = make_fx(run, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*fakes)
    except CaptureError:
        raise
    except Exception as exc:  # translate what the user can act on, re-raise the rest
        translated = _translate_error(exc)
        if translated is not None:
            raise translated from exc
        raise CaptureError(f"capture failed at {_user_frame(exc)}: {type(exc).__name__}: {exc}") from exc

    _check_twice_differentiable(gm.graph)
    link_backward_nodes(gm.graph, state)
    downstream_of_backward_is_backward(gm.graph)
    removed = remove_autograd_detaches(gm)
    index_put_to_index_add(gm)  # the geometry's gradient: a sort-free scatter-add
    names = [f"param_{n}" for n in param_names] + [f"buffer_{n}" for n in buffer_names] + list(fields)
    _rename_placeholders(gm, names)
    guards = SizeGuards.from_trace(mode.shape_env, input_symbols)
    annotate_named_shapes(gm.graph, mode.shape_env, guards)
    graph = ForceGraph(gm, param_names, buffer_names, fields, output_names, guards)
    _check_conservative(graph)
    log.info(
        "captured %s: %d nodes, %d autograd detaches removed, sizes %s",
        type(model).__name__,
        len(gm.graph.nodes),
        removed,
        {k: str(v) for k, v in guards.symbols.items()},
    )
    return graph


def _check_twice_differentiable(graph: fx.Graph) -> None:
    """Backward code that ran with grad mode off cannot be differentiated again.

    With ``create_graph=True`` the autograd engine runs backward formulas with grad
    mode on; a custom autograd.Function marked ``once_differentiable`` runs its backward
    with it off. Eager PyTorch then fails at ``loss.backward()``; a captured graph would
    silently differentiate it anyway, so refuse it here.
    """
    backward = [n for n in graph.nodes if GRAD_ENABLED in n.meta]
    if not any(n.meta[GRAD_ENABLED] for n in backward):
        return  # captured for inference (create_graph=False): nothing to differentiate twice
    for n in backward:
        if not n.meta[GRAD_ENABLED]:
            raise NoDoubleBackwardError(
                f"the backward of {n.meta.get(GRAD_FN)} (op {n.target}, module "
                f"{n.meta.get(MODULE) or '<root>'!r}) is not differentiable (once_differentiable "
                "or computed under no_grad), so forces from it cannot be trained: give that "
                "autograd.Function a backward made of differentiable torch ops, or replace it by plain torch ops."
            )


def _check_conservative(graph: ForceGraph) -> None:
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    output = next(n for n in graph.gm.graph.nodes if n.op == "output")
    outs = dict(zip(graph.output_names, output.args[0]))
    positions = nodes.get("positions")
    energy = outs["energy"]
    if positions is None or not isinstance(energy, fx.Node) or not _depends_on(energy, positions):
        raise NotConservativeError(
            "the captured energy does not depend on batch.positions, so the forces are not "
            "-dE/dR: compute the energy from positions (through edge vectors r_ij) and do not detach them."
        )
    forces = outs["forces"]
    if not any(n.meta.get(PHASE) == "G" for n in graph.gm.graph.nodes) or not isinstance(forces, fx.Node):
        raise NotConservativeError(
            "no force-gradient (G) nodes were captured: the model must compute forces with "
            "torch.autograd.grad(energy, positions, create_graph=self.training) inside forward()."
        )


def size_values(graph: ForceGraph, batch: AtomsBatch) -> Dict[str, int]:
    return batch_sizes(graph.batch_fields, [getattr(batch, f) for f in graph.batch_fields])
