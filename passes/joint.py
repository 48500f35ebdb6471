"""Joint pass: the whole training step as one first-order graph, all four phases labelled.

The captured force graph (F, G) is replayed under symbolic `make_fx`, the loss is
computed from its outputs, and ``torch.autograd.grad(loss, params)`` is traced. Because
the force graph is explicit, that gradient is an ordinary backward (no double backward
left): its nodes are the backward of F nodes (FB) and of G nodes (GG). Every replayed
node keeps its capture labels; every backward node links to the node it differentiates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..data.batch import AtomsBatch, present_targets
from ..errors import CaptureError, NoDoubleBackwardError
from .capture import ForceGraph, _rename_placeholders, _translate_error, _user_frame
from .fake_inputs import FIELD_DIM, SizeGuards, annotate_named_shapes, fake_input, new_fake_mode
from .index_add import index_put_to_index_add
from .labels import BACKWARD_OF, FORWARD_NODE, IS_LOSS, MODULE, PHASE
from .tracing import LabelState, labelling, link_backward_nodes, remove_autograd_detaches

log = logging.getLogger(__name__)

LossFn = Callable[[Mapping[str, torch.Tensor], AtomsBatch], torch.Tensor]
_PENDING = "B"  # phase of backward nodes until their link says FB or GG


@dataclass
class JointGraph:
    """One training step: inputs (params, buffers, batch fields, targets) → outputs
    (loss, model outputs in ``output_names`` order, one gradient per parameter)."""

    gm: fx.GraphModule
    param_names: List[str]
    buffer_names: List[str]
    batch_fields: List[str]
    target_fields: List[str]
    output_names: List[str]
    guards: SizeGuards

    def flat_inputs(self, params, buffers, batch: AtomsBatch) -> List[torch.Tensor]:
        return (
            [params[n] for n in self.param_names]
            + [buffers[n] for n in self.buffer_names]
            + [getattr(batch, f) for f in self.batch_fields + self.target_fields]
        )

    def __call__(self, params, buffers, batch: AtomsBatch):
        """Returns (loss, {output name: tensor}, {param name: grad})."""
        return self.unflatten(self.gm(*self.flat_inputs(params, buffers, batch)))

    def unflatten(self, outs):
        """(loss, {output name: tensor}, {param name: grad}) from the flat outputs."""
        k = len(self.output_names)
        return outs[0], dict(zip(self.output_names, outs[1 : 1 + k])), dict(zip(self.param_names, outs[1 + k :]))


class _LabelledReplay(fx.Interpreter):
    """Runs the force graph so that each new node inherits the labels of its source."""

    def __init__(self, gm: fx.GraphModule, state: LabelState, origin_of: Dict[str, fx.Node]) -> None:
        super().__init__(gm)
        self.state = state
        self.origin_of = origin_of

    def run_node(self, n: fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        self.state.origin = {PHASE: n.meta.get(PHASE), MODULE: n.meta.get(MODULE, ""), "_source": n.name}
        try:
            return super().run_node(n)
        finally:
            self.state.origin = None


def _translate_backward_error(exc: Exception) -> Optional[CaptureError]:
    text = str(exc)
    if "not implemented" in text and "derivative" in text or "once_differentiable" in text or (
        "double backward" in text.lower()
    ):
        return NoDoubleBackwardError(
            f"an op in the force graph has no derivative formula, so a loss on forces cannot "
            f"be trained ({text.splitlines()[0]}). Replace that op in the model by one that is "
            "twice differentiable (for example torch.cdist → explicit differences and sqrt; a "
            "custom autograd.Function → plain torch ops or a backward that is itself differentiable)."
        )
    return None


def build_joint_graph(
    force_graph: ForceGraph,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    example_batch: AtomsBatch,
    loss_fn: LossFn,
) -> JointGraph:
    """Trace loss + parameter gradients of `force_graph` into a labelled `JointGraph`."""
    targets = present_targets(example_batch)
    example_batch.validate(need=tuple(force_graph.batch_fields))
    fg = force_graph
    mode = new_fake_mode()
    fakes = [fake_input(mode, params[n].detach().requires_grad_(True), None) for n in fg.param_names]
    fakes += [fake_input(mode, buffers[n], None) for n in fg.buffer_names]
    input_symbols = {s: [] for s in ("atoms", "edges", "structures")}
    for f in fg.batch_fields + targets:
        if f not in FIELD_DIM:  # a scalar (loss normaliser): nothing symbolic
            fakes.append(fake_input(mode, getattr(example_batch, f), None))
            continue
        dim, size = FIELD_DIM[f]
        fake = fake_input(mode, getattr(example_batch, f), dim)
        input_symbols[size].append(fake.shape[dim].node.expr)
        fakes.append(fake)
    n_params, n_state = len(fg.param_names), len(fg.param_names) + len(fg.buffer_names)
    state = LabelState(phase="F", backward_phase=_PENDING)
    origin_of: Dict[str, fx.Node] = {}

    def step(*flat: torch.Tensor):
        p = list(flat[:n_params])
        rest = list(flat[n_params:n_state])
        fields = dict(zip(fg.batch_fields + targets, flat[n_state:]))
        batch = AtomsBatch(**fields)
        with labelling(state, None):
            outs = _LabelledReplay(fg.gm, state, origin_of).run(*p, *rest, *[fields[f] for f in fg.batch_fields])
            out = dict(zip(fg.output_names, outs))
            state.phase = "F"
            loss_start = state.graph._root._prev
            loss = loss_fn(out, batch)
            _mark_loss_nodes(loss_start, state.graph)
            grads = torch.autograd.grad(loss, p, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(p, grads)]
        return (loss, *outs, *grads)

    try:
        with mode:
            gm = make_fx(step, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*fakes)
    except CaptureError:
        raise
    except Exception as exc:
        translated = _translate_backward_error(exc) or _translate_error(exc)
        if translated is not None:
            raise translated from exc
        raise CaptureError(f"building the training graph failed at {_user_frame(exc)}: {type(exc).__name__}: {exc}") from exc

    _map_replayed_links(gm.graph, fg)
    link_backward_nodes(gm.graph, state)
    _finish_labels(gm.graph)
    remove_autograd_detaches(gm)
    index_put_to_index_add(gm)  # gathers' backward (FB, GG): a sort-free scatter-add
    names = (
        [f"param_{n}" for n in fg.param_names]
        + [f"buffer_{n}" for n in fg.buffer_names]
        + fg.batch_fields
        + [f"target_{t}" for t in targets]
    )
    _rename_placeholders(gm, names)
    guards = SizeGuards.from_trace(mode.shape_env, input_symbols)
    annotate_named_shapes(gm.graph, mode.shape_env, guards)
    log.info("joint graph: %d nodes", len(gm.graph.nodes))
    return JointGraph(gm, fg.param_names, fg.buffer_names, fg.batch_fields, targets, fg.output_names, guards)


def _mark_loss_nodes(start: fx.Node, graph: fx.Graph) -> None:
    node = start._next
    while node is not graph._root:
        node.meta[IS_LOSS] = True
        node = node._next


def _map_replayed_links(graph: fx.Graph, fg: ForceGraph) -> None:
    """A replayed G node links to the joint node replaying its F node."""
    joint_of_source: Dict[str, str] = {}
    for n in graph.nodes:
        src = n.meta.get("_source")
        if src is not None:
            joint_of_source[src] = n.name  # the last joint node of a source node wins
    source_meta = {n.name: n.meta for n in fg.gm.graph.nodes}
    for n in graph.nodes:
        src = n.meta.pop("_source", None)
        if src is not None:
            link = source_meta[src].get(FORWARD_NODE)
            if link is not None:
                n.meta[FORWARD_NODE] = joint_of_source.get(link)


def _finish_labels(graph: fx.Graph) -> None:
    """Phase the loss nodes by what they consume; resolve pending backward phases."""
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        if n.op == "call_function" and n.meta.get(IS_LOSS):
            n.meta[MODULE] = "loss"
            g_inputs = [m for m in n.all_input_nodes if m.meta.get(PHASE) == "G"]
            n.meta[PHASE] = "G" if g_inputs else "F"
            if g_inputs:  # a loss on forces sits where the forces are: fold it like them
                n.meta[FORWARD_NODE] = g_inputs[0].meta.get(FORWARD_NODE)
    for n in graph.nodes:
        if n.op == "call_function" and n.meta.get(PHASE) == _PENDING:
            target = by_name.get(n.meta.get(FORWARD_NODE))
            target_phase = target.meta.get(PHASE) if target is not None else "F"
            n.meta[PHASE] = BACKWARD_OF.get(target_phase, "FB")
            if target is not None:
                n.meta[MODULE] = target.meta.get(MODULE, "")
