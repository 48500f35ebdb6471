"""Runs one rank's program: compute split graphs, move tensors, accumulate gradients.

The executor is deliberately small: the schedule (what runs when, what is sent where)
is decided beforehand and written in the rank's `RankProgram`; here each action is
carried out over torch.distributed point-to-point (gloo on CPU, NCCL on CUDA).

- Values live in one environment per micro-batch, keyed by joint-graph node names; a
  value is dropped after its last use on this rank (stash memory is freed as soon as
  the later phase that needed it has run).
- Receive buffers are allocated from the symbolic shape of the tensor evaluated at the
  micro-batch's sizes (atoms, edges, structures): no shape handshake.
- Messages on one (src, dst) channel carry increasing tags, so they match in program
  order; the program validator guarantees both sides agree on that order.
- Sends are asynchronous (``isend``) and overlap the following computation. A pending
  send keeps its tensor alive, and gloo reports a send complete only once it is waited
  for (polling ``is_completed`` never frees anything), so each send is waited for right
  after the first receive that proves it arrived (`program.send_releases`: the peer
  answered after receiving it), which returns at once; sends with no such answer are
  waited for at the end of the step.
- Receives are posted ahead (``irecv``): when a compute starts, every receive up to the
  compute after next is already posted, so its transfer runs while this rank computes;
  the program's Recv action only waits for it. Posting in program order keeps the tags
  of every channel in program order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import sympy
import torch
import torch.distributed as dist

from .program import Compute, GradSync, OptimizerStep, Recv, RankProgram, Send

log = logging.getLogger(__name__)

GroupKey = Tuple[int, str]


@dataclass
class TensorSpec:
    """Shape (sympy expressions in atoms / edges / structures, as text) and dtype of a message."""

    shape: Tuple[str, ...]
    dtype: torch.dtype

    def __getstate__(self):  # the compiled shape function is rebuilt in each process
        return {k: v for k, v in self.__dict__.items() if k != "_dims_fn"}

    def materialise(self, sizes: Mapping[str, int], device: torch.device) -> torch.Tensor:
        # Parsing the shape text is slow (sympy); it happens once per spec and process,
        # not on every receive of every step.
        fn = self.__dict__.get("_dims_fn")
        if fn is None:
            names = ("atoms", "edges", "structures")
            args = [sympy.Symbol(k, integer=True, positive=True) for k in names]
            exprs = [sympy.sympify(s, locals=dict(zip(names, args))) for s in self.shape]
            fn = sympy.lambdify(args, exprs, modules="math")
            self.__dict__["_dims_fn"] = fn
        dims = [int(d) for d in fn(*(sizes.get(k, 0) for k in ("atoms", "edges", "structures")))]
        return torch.empty(dims, dtype=self.dtype, device=device)


@dataclass
class StageGraphs:
    """What a rank needs to run its share: the split graphs and how to wire them.

    Picklable (GraphModules pickle as code), so a launcher can hand it to workers.
    """

    groups: Dict[GroupKey, Any]  # (chunk, phase) -> fx.GraphModule
    inputs: Dict[GroupKey, List[str]]
    outputs: Dict[GroupKey, List[str]]
    input_names: List[str]  # joint-graph placeholders, in order
    output_args: List[Any]  # joint-graph outputs: node names or constants
    specs: Dict[str, TensorSpec]  # every value that may cross ranks

    @staticmethod
    def from_plan(plan) -> "StageGraphs":
        specs: Dict[str, TensorSpec] = {}
        for g in plan.groups.values():
            for node in g.gm.graph.nodes:
                if node.op == "placeholder" and "shape" in node.meta and isinstance(node.meta.get("dtype"), torch.dtype):
                    specs[node.name] = TensorSpec(tuple(str(s) for s in node.meta["shape"]), node.meta["dtype"])
        return StageGraphs(
            {k: g.gm for k, g in plan.groups.items()},
            {k: list(g.inputs) for k, g in plan.groups.items()},
            {k: list(g.outputs) for k, g in plan.groups.items()},
            list(plan.input_names),
            list(plan.output_args),
            specs,
        )


    def on_device(self, device: torch.device) -> "StageGraphs":
        """The same graphs creating their tensors on ``device`` (`passes.devices`)."""
        from janus_compile.passes.devices import retarget_devices

        groups = {key: retarget_devices(gm, device) for key, gm in self.groups.items()}
        return StageGraphs(groups, self.inputs, self.outputs, self.input_names, self.output_args, self.specs)


@dataclass
class StepResult:
    outputs: Dict[int, Dict[str, torch.Tensor]]  # mb -> joint output name -> value (those this rank computed)
    trace: List[Dict[str, Any]] = field(default_factory=list)  # Chrome-trace events


class RankLostError(RuntimeError):
    """A peer rank stopped answering (died, or timed out) during a step."""


def _fault_injection(rank: int, step: int) -> Optional[int]:
    """JANUSPIPE_FAULT="rank:step:action" makes that rank exit abruptly at that action of
    that step (for fault tests: a real process death, not an exception)."""
    import os

    spec = os.environ.get("JANUSPIPE_FAULT")
    if not spec:
        return None
    r, s, k = (int(x) for x in spec.split(":"))
    return k if r == rank and s == step else None


def last_uses(graphs: StageGraphs, program: RankProgram) -> Dict[Tuple[int, str], int]:
    """(micro-batch, value) -> index of the last action of ``program`` that reads it.

    The executor frees a value after that action; `passes/memory.py` replays the same rule.
    """
    last: Dict[Tuple[int, str], int] = {}
    for k, action in enumerate(program.actions):
        if isinstance(action, Compute):
            for name in graphs.inputs[(action.chunk, action.phase)]:
                last[(action.mb, name)] = k
        elif isinstance(action, Send):
            for name in action.tensors:
                last[(action.mb, name)] = k
    return last


def prefetch_limits(program: RankProgram) -> Dict[int, int]:
    """Compute action index -> last action index whose receive is posted when it starts:
    every receive up to the compute after next."""
    computes = [k for k, a in enumerate(program.actions) if isinstance(a, Compute)]
    limits: Dict[int, int] = {}
    for n, k in enumerate(computes):
        limits[k] = computes[n + 2] - 1 if n + 2 < len(computes) else len(program.actions) - 1
    return limits


class RankExecutor:
    """Runs pipeline stage ``rank``'s program. ``peers[q]`` is the world rank of pipeline
    stage q in this process's (dp, gp) slice of the mesh (default: q itself)."""

    def __init__(
        self,
        rank: int,
        graphs: StageGraphs,
        program: RankProgram,
        device: torch.device,
        peers: Optional[Sequence[int]] = None,
        releases: Optional[Mapping[int, Sequence[int]]] = None,
        inductor: bool = False,
    ) -> None:
        self.rank = rank
        self.inductor = inductor
        self._compiled: Dict[GroupKey, Callable[..., Any]] = {}  # group -> its graph through TorchInductor
        self.peers = list(peers) if peers is not None else None
        self.world_rank = self.peers[rank] if self.peers is not None else rank
        self.graphs = graphs
        self.program = program
        self.device = device
        # last use of every value on this rank, per micro-batch: free it afterwards
        self._last_use = last_uses(graphs, program)
        self._keep = {a for a in graphs.output_args if isinstance(a, str)}  # step outputs are never freed
        self._prefetch_limit = prefetch_limits(program)
        # Recv index -> Send indices delivered by then (`program.send_releases`): waited
        # for there, so a sent tensor is freed long before the end of the step
        self._releases = {k: list(v) for k, v in (releases or {}).items()}

    def run(
        self,
        microbatch_inputs: Sequence[Sequence[Any]],
        microbatch_sizes: Sequence[Mapping[str, int]],
        trace: bool = False,
        step: int = 0,
        on_compute: Optional[Callable[[int, Dict[str, Any]], None]] = None,
    ) -> StepResult:
        """Execute the program once. ``microbatch_inputs[m]`` are the joint graph's flat
        inputs for micro-batch m (parameters, buffers, batch fields, targets).
        ``on_compute(k, outputs)`` is called after compute action k with what it produced
        (the gradient sync uses it to start reducing gradients that are final)."""
        envs: List[Dict[str, Any]] = [dict(zip(self.graphs.input_names, flat)) for flat in microbatch_inputs]
        channel_tag: Dict[Tuple[int, int], int] = {}
        pending: Dict[int, List[Any]] = {}  # Send action index -> its works, not yet waited for
        actions = self.program.actions
        posted: Dict[int, List[Tuple[str, torch.Tensor, Any]]] = {}  # Recv index -> (name, buffer, work)
        next_post = 0  # actions before this index have had their receives posted

        def post_until(limit: int) -> None:
            nonlocal next_post
            while next_post <= min(limit, len(actions) - 1):
                a = actions[next_post]
                if isinstance(a, Recv):
                    posts = []
                    for t in a.tensors:
                        tag = channel_tag.get((a.src, self.rank), 0)
                        channel_tag[(a.src, self.rank)] = tag + 1
                        buf = self.graphs.specs[t].materialise(microbatch_sizes[a.mb], self.device)
                        posts.append((t, buf, dist.irecv(buf, src=self._world(a.src), tag=tag)))
                    posted[next_post] = posts
                next_post += 1
        events: List[Dict[str, Any]] = []
        t0 = time.perf_counter()
        fault_at = _fault_injection(self.world_rank, step)
        for k, action in enumerate(actions):
            if fault_at == k:
                import os

                os._exit(17)
            start = time.perf_counter()
            if isinstance(action, Compute):
                post_until(self._prefetch_limit[k])
                key = (action.chunk, action.phase)
                env = envs[action.mb]
                args = [env[name] for name in self.graphs.inputs[key]]
                outs = self._group_fn(key)(*args)
                env.update(zip(self.graphs.outputs[key], outs))
                if on_compute is not None:
                    on_compute(k, dict(zip(self.graphs.outputs[key], outs)))
                # the env alone holds values now: a value past its last use is freed by
                # `_free` below, not kept until the next compute rebinds these names
                args = outs = None
                name = f"{action.phase}{action.chunk} mb{action.mb}"
            elif isinstance(action, Send):
                env = envs[action.mb]
                works = pending.setdefault(k, [])
                for t in action.tensors:
                    tag = channel_tag.get((self.rank, action.dst), 0)
                    channel_tag[(self.rank, action.dst)] = tag + 1
                    works.append(dist.isend(env[t].contiguous(), dst=self._world(action.dst), tag=tag))
                name = f"send {action.phase}{action.chunk} mb{action.mb} -> {action.dst}"
            elif isinstance(action, Recv):
                env = envs[action.mb]
                post_until(k)
                posts = posted.pop(k)
                try:
                    for t, buf, w in posts:
                        w.wait()
                        env[t] = buf
                except RuntimeError as exc:
                    raise RankLostError(
                        f"rank {self.world_rank} lost rank {self._world(action.src)} while receiving {list(action.tensors)} for "
                        f"{action.phase}{action.chunk} micro-batch {action.mb}: {exc}"
                    ) from exc
                posts = buf = w = None  # likewise: received buffers live in the env only
                name = f"recv {action.phase}{action.chunk} mb{action.mb} <- {action.src}"
                for sent in self._releases.get(k, ()):
                    self._wait_sends(pending.pop(sent, []))  # delivered: returns at once
            elif isinstance(action, (GradSync, OptimizerStep)):
                continue  # handled by the trainer around the step
            else:  # pragma: no cover - the IR has no other actions
                raise TypeError(f"unknown action {action!r}")
            self._free(envs, action, k)
            if trace:
                event = {"name": name, "ph": "X", "pid": self.rank, "tid": 0, "ts": (start - t0) * 1e6, "dur": (time.perf_counter() - start) * 1e6}
                if isinstance(action, Compute):
                    event["args"] = {"chunk": action.chunk, "phase": action.phase, "mb": action.mb}
                events.append(event)
        for works in pending.values():
            self._wait_sends(works)
        return self._collect(envs, events)

    def _group_fn(self, key: GroupKey) -> Callable[..., Any]:
        """The group's graph, or (option ``inductor``) the graph compiled by TorchInductor
        on its first run."""
        if not self.inductor:
            return self.graphs.groups[key]
        if key not in self._compiled:
            from janus_compile.compiled import compile_with_inductor

            self._compiled[key] = compile_with_inductor(self.graphs.groups[key])
        return self._compiled[key]

    def _wait_sends(self, works: List[Any]) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as exc:
            raise RankLostError(f"rank {self.world_rank}: a send did not complete (peer lost or timed out): {exc}") from exc

    def _world(self, pipeline_rank: int) -> int:
        return self.peers[pipeline_rank] if self.peers is not None else pipeline_rank

    def _free(self, envs, action, k: int) -> None:
        mb = getattr(action, "mb", None)
        if mb is None:
            return
        env = envs[mb]
        names = self.graphs.inputs[(action.chunk, action.phase)] if isinstance(action, Compute) else getattr(action, "tensors", ())
        for name in names:
            if self._last_use.get((mb, name)) == k and name not in self._keep and name not in self.graphs.input_names:
                env.pop(name, None)

    def _collect(self, envs, events) -> StepResult:
        outputs: Dict[int, Dict[str, torch.Tensor]] = {}
        for mb, env in enumerate(envs):
            outputs[mb] = {
                a: env[a] for a in self.graphs.output_args if isinstance(a, str) and a in env and a not in self.graphs.input_names
            }
        return StepResult(outputs, events)
