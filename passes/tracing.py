"""Symbolic aten tracing with labels: the machinery the capture and joint passes share.

`make_fx` records aten ops as they run, including the ops the autograd engine runs
inside ``torch.autograd.grad``; that is how the force graph becomes explicit. Around
it we keep three small observers that label every new node as it is created:

- module hooks keep the stack of module calls (→ ``module``);
- a TorchFunctionMode sees every top-level torch call of the user's code, records
  which autograd sequence numbers it allocated (to link backward nodes to the forward
  node whose grad_fn they run) and tells user ``detach`` calls apart from the ones
  autograd inserts when it saves an output for backward (pitfall: those must go);
- a TorchDispatchMode labels each new aten node with the current phase and module,
  and, inside a backward, with the sequence number of the autograd node being run.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .labels import AUTOGRAD_DETACH, FORWARD_NODE, MODULE, PHASE

log = logging.getLogger(__name__)

_DETACH_NAMES = {"detach", "detach_"}
_BACKWARD_SEQ = "_backward_seq"
GRAD_ENABLED = "grad_enabled"  # was grad mode on when the autograd engine ran this node?
GRAD_FN = "grad_fn"  # name of the autograd node whose backward produced this node


@dataclass
class _Interval:
    start: int  # first autograd sequence number allocated by the call
    stop: int  # one past the last
    node: fx.Node  # last node the call created: the one backward nodes link to


@dataclass
class LabelState:
    """Mutable labelling state for one trace."""

    graph: Optional[fx.Graph] = None
    phase: str = "F"
    # Phase given to nodes created while the autograd engine runs (inside a backward).
    backward_phase: str = "G"
    module_stack: List[str] = field(default_factory=lambda: [""])
    user_detach: int = 0
    last: Optional[fx.Node] = None
    intervals: List[_Interval] = field(default_factory=list)
    # Set by an interpreter replaying an already-labelled graph: new nodes inherit these.
    origin: Optional[Dict[str, Any]] = None

    def new_nodes(self) -> Iterator[fx.Node]:
        """Nodes appended to the graph since the last call."""
        root = self.graph._root
        node = self.last if self.last is not None else root
        node = node._next
        while node is not root:
            yield node
            self.last = node
            node = node._next

    def mark_seen(self) -> None:
        for _ in self.new_nodes():
            pass


class _FunctionObserver(TorchFunctionMode):
    """Top-level torch calls: user detaches and autograd-sequence intervals."""

    def __init__(self, state: LabelState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = self.state
        is_detach = getattr(func, "__name__", "") in _DETACH_NAMES
        start = torch.autograd._get_sequence_nr()
        before = state.graph._root._prev
        if is_detach:
            state.user_detach += 1
        try:
            out = func(*args, **kwargs)
        finally:
            if is_detach:
                state.user_detach -= 1
        stop = torch.autograd._get_sequence_nr()
        after = state.graph._root._prev
        if stop > start and after is not before and torch._C._current_autograd_node() is None:
            state.intervals.append(_Interval(start, stop, after))
        return out


class _DispatchLabeller(TorchDispatchMode):
    """Labels every aten node right after the proxy mode below creates it."""

    def __init__(self, state: LabelState) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = self.state
        out = func(*args, **kwargs)
        grad_node = torch._C._current_autograd_node()
        in_backward = grad_node is not None
        for node in state.new_nodes():
            if state.origin is not None and not in_backward:
                node.meta.update(state.origin)
            else:
                node.meta[PHASE] = state.backward_phase if in_backward else state.phase
                node.meta[MODULE] = state.module_stack[-1]
            if in_backward:
                node.meta[_BACKWARD_SEQ] = grad_node._sequence_nr()
                node.meta[GRAD_ENABLED] = torch.is_grad_enabled()
                node.meta[GRAD_FN] = type(grad_node).__name__
            if func is torch.ops.aten.detach.default and state.user_detach == 0:
                node.meta[AUTOGRAD_DETACH] = True
        return out


@contextlib.contextmanager
def _module_hooks(root: Optional[torch.nn.Module], state: LabelState) -> Iterator[None]:
    if root is None:
        yield
        return
    paths = {id(m): name for name, m in root.named_modules()}

    def pre(module, args):
        path = paths.get(id(module))
        if path is not None:
            state.module_stack.append(path)

    def post(module, args, output):
        if paths.get(id(module)) is not None and len(state.module_stack) > 1:
            state.module_stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


@contextlib.contextmanager
def _grad_calls_are_backward(state: LabelState) -> Iterator[None]:
    """Ops run by ``torch.autograd.grad`` outside a grad_fn (seeds, sums) are backward too."""
    original = torch.autograd.grad

    def grad(*args, **kwargs):
        saved = state.phase
        state.phase = state.backward_phase
        try:
            return original(*args, **kwargs)
        finally:
            state.phase = saved

    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original


@contextlib.contextmanager
def labelling(state: LabelState, root: Optional[torch.nn.Module] = None) -> Iterator[None]:
    """Enter inside the function being traced by make_fx."""
    proxy_mode = get_proxy_mode()
    assert proxy_mode is not None, "labelling() must run inside make_fx"
    state.graph = proxy_mode.tracer.graph
    state.mark_seen()
    with _module_hooks(root, state), _grad_calls_are_backward(state):
        with _FunctionObserver(state), _DispatchLabeller(state):
            yield


def link_backward_nodes(graph: fx.Graph, state: LabelState) -> None:
    """Give each backward node a ``forward_node`` link and the module of that node.

    A node run inside the grad_fn with sequence number s links to the forward node of
    the torch call that allocated s. Nodes with no grad_fn of their own (gradient seeds,
    sums of gradient contributions) inherit a link from a linked neighbour.
    """
    intervals = sorted(state.intervals, key=lambda iv: iv.start)
    starts = [iv.start for iv in intervals]
    nodes = list(graph.nodes)
    for node in nodes:
        seq = node.meta.pop(_BACKWARD_SEQ, None)
        if seq is None or node.meta.get(FORWARD_NODE) is not None:
            continue
        k = bisect.bisect_right(starts, seq) - 1
        if k >= 0 and seq < intervals[k].stop:
            target = intervals[k].node
            node.meta[FORWARD_NODE] = target.name
            node.meta[MODULE] = target.meta.get(MODULE, "")
    _inherit_links(nodes)


def downstream_of_backward_is_backward(graph: fx.Graph, forward: str = "F", backward: str = "G") -> int:
    """Relabel forward-phase nodes that consume backward-phase values (e.g. ``-grad``).

    Code after ``torch.autograd.grad`` (negating the gradient into forces, dividing the
    virial by the volume) runs outside the autograd engine but belongs to the force
    phase: it needs the gradient, so it can only run once the backward has reached it.
    """
    moved = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.meta.get(PHASE) != forward:
            continue
        for src in node.all_input_nodes:
            if src.meta.get(PHASE) == backward:
                node.meta[PHASE] = backward
                node.meta[FORWARD_NODE] = src.meta.get(FORWARD_NODE)
                moved += 1
                break
    return moved


def _inherit_links(nodes: Sequence[fx.Node]) -> None:
    def unlinked(n: fx.Node) -> bool:
        return (
            n.op == "call_function"
            and n.meta.get(PHASE) not in (None, "F")
            and n.meta.get(FORWARD_NODE) is None
        )

    def borrow(n: fx.Node, neighbours) -> bool:
        for m in neighbours:
            if m.meta.get(PHASE) == n.meta.get(PHASE) and m.meta.get(FORWARD_NODE) is not None:
                n.meta[FORWARD_NODE] = m.meta[FORWARD_NODE]
                n.meta[MODULE] = m.meta.get(MODULE, "")
                return True
        return False

    changed = True
    while changed:
        changed = False
        for n in nodes:
            if unlinked(n) and borrow(n, n.all_input_nodes):
                changed = True
        for n in reversed(nodes):
            if unlinked(n) and borrow(n, list(n.users)):
                changed = True


def remove_autograd_detaches(gm: fx.GraphModule) -> int:
    """Drop the ``aten.detach`` nodes autograd inserted on saved outputs.

    Under make_fx, saving an output for backward (tanh, sigmoid, exp, softmax, ...)
    records a detach; the backward formula then reads the detached copy, so the
    captured force stops depending on the weights through that path and training
    gradients are wrong. A detach is the identity on values, so removing it is exact.
    """
    replaced: Dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.meta.get(AUTOGRAD_DETACH):
            source = node.args[0]
            replaced[node.name] = replaced.get(source.name, source.name)
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    for node in gm.graph.nodes:  # links to a removed detach now point at what it detached
        link = node.meta.get(FORWARD_NODE)
        if link in replaced:
            node.meta[FORWARD_NODE] = replaced[link]
    removed = len(replaced)
    gm.graph.lint()
    gm.recompile()
    return removed
