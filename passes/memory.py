"""Peak memory per rank: replay each rank's program the way the executor holds its values.

`Partition.rank_memory` counts parameters and stash, the part a partition decides. What a
rank really peaks at also holds the receive buffers posted ahead, step outputs kept to
the end (per-micro-batch parameter gradients, energies, forces), values waiting for a
later send, and, while a group runs, that group's own working set: the intermediates of
its graph that are alive at once. This pass replays a rank's program with the executor's
own rules (`runtime.executor.last_uses`, `prefetch_limits`; a sent value stays alive
until the receive that proves it arrived, `runtime.program.send_releases`, or the end of
the step) and each group's graph in
order (an intermediate dies after its last reader; a view keeps its base alive), at the
sizes of every micro-batch, and reports the worst moment.

It is what a measured peak (CUDA allocator, or CPU resident memory above the loaded
worker) should confirm; `januspipe bench` prints both.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Set, Tuple

import sympy
import torch
import torch.fx as fx

from janus_compile.runtime.executor import StageGraphs, last_uses, prefetch_limits
from janus_compile.runtime.program import Compute, ProgramSet, Recv, Send

from .cost import VIEW_OPS, _subs, nbytes, op_name

Sizes = Mapping[str, int]
GroupKey = Tuple[int, str]


@dataclass
class RankMemory:
    """Bytes one rank holds at its worst moment of a step (parameters and inputs excluded)."""

    rank: int
    peak_bytes: float  # held values + posted receives + the running group's working set
    peak_action: int  # index of the program action at which the peak happens
    held_peak_bytes: float  # values held between actions (stash, received, outputs), at their worst
    workspace_peak_bytes: float  # the largest working set of one group (at any micro-batch)

    def describe(self) -> str:
        return (
            f"rank {self.rank}: peak {self.peak_bytes / 2**20:.1f} MiB at action {self.peak_action} "
            f"(held at most {self.held_peak_bytes / 2**20:.1f} MiB, largest group working set "
            f"{self.workspace_peak_bytes / 2**20:.1f} MiB)"
        )


def _is_alias(node: fx.Node) -> bool:
    """Outputs that share their first argument's storage: views, tuple items, and in-place
    ops (``copy_``, ``add_``, ...), which return the tensor they wrote into."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.getitem:
        return True
    name = op_name(node)
    return name in VIEW_OPS or (name.endswith("_") and not name.endswith("__"))


def _storage_owner(node: fx.Node) -> fx.Node:
    """The node whose output storage ``node`` shares (itself unless it is a view)."""
    while _is_alias(node):
        node = node.args[0]
    return node


def _float(expr, sizes: Sizes) -> float:
    return float(sympy.sympify(expr).xreplace(_subs(sizes))) if expr != 0 else 0.0


class _GroupWorkspace:
    """Peak bytes of a group graph's intermediates (not its inputs), per micro-batch size."""

    def __init__(self, gm: fx.GraphModule) -> None:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        returned = set(output.all_input_nodes)
        # views share their owner's storage; a view of an input allocates nothing
        base = {n: owner if (owner := _storage_owner(n)).op == "call_function" else None for n in nodes}
        position = {n: i for i, n in enumerate(nodes)}
        death = {}  # storage owner -> position after which it is freed (None: returned)
        for n in nodes:
            owner = base[n]
            if owner is None:
                continue
            if n in returned or death.get(owner, 0) is None:
                death[owner] = None
                continue
            last = max((position[u] for u in n.users if u in position), default=position[n])
            death[owner] = max(death.get(owner, position[owner]), last)
        self._alloc = [(position[n], nbytes(n)) for n in nodes if base[n] is n]
        self._free = {}
        for owner, at in death.items():
            if at is not None:
                self._free.setdefault(at, []).append(nbytes(owner))
        self._count = len(nodes)
        self._cache: Dict[Tuple[Tuple[str, int], ...], float] = {}

    def peak(self, sizes: Sizes) -> float:
        key = tuple(sorted(sizes.items()))
        if key not in self._cache:
            alloc: Dict[int, float] = {}
            for at, expr in self._alloc:
                alloc[at] = alloc.get(at, 0.0) + _float(expr, sizes)
            live = peak = 0.0
            for i in range(self._count):
                live += alloc.get(i, 0.0)
                peak = max(peak, live)
                live -= sum(_float(e, sizes) for e in self._free.get(i, ()))
            self._cache[key] = peak
        return self._cache[key]


@dataclass
class _ValueStorage:
    """How the values between groups map to storage.

    ``own[name]``: bytes of the value's own tensor (what a receive allocates for it);
    ``storage[name]``: bytes of the storage a producing group allocates for it (its
    storage owner's, counted once per owner); ``parent[name]``: the value whose storage it
    shares on the producing rank: a group input it is a view of, or the first output that
    is a view of the same intermediate. Several views of one intermediate, or a view of an
    input, keep the whole storage alive as long as any of them is held."""

    own: Dict[str, object]
    storage: Dict[str, object]
    parent: Dict[str, str]
    # outputs that are not contiguous (a transpose, an expand): sending one sends a
    # contiguous copy of its own size, which the pending send holds instead of the value
    strided: Set[str] = field(default_factory=set)


def _value_storage(graphs: StageGraphs) -> _ValueStorage:
    strided: Set[str] = set()
    own: Dict[str, object] = {}
    storage: Dict[str, object] = {}
    parent: Dict[str, str] = {}
    for key, gm in graphs.groups.items():
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        input_of = dict(zip(placeholders, graphs.inputs[key]))
        for n, name in input_of.items():
            own.setdefault(name, nbytes(n))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        values = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        first_of_owner: Dict[fx.Node, str] = {}
        for name, v in zip(graphs.outputs[key], values):
            if not isinstance(v, fx.Node) or name in storage or name in parent:
                continue
            own.setdefault(name, nbytes(v))
            if not _is_contiguous(v):
                strided.add(name)
            owner = _storage_owner(v)
            if owner.op == "placeholder":
                source = input_of.get(owner)
                if source is not None and source != name:
                    parent[name] = source
                else:
                    storage[name] = 0
            elif owner in first_of_owner:
                parent[name] = first_of_owner[owner]
            else:
                first_of_owner[owner] = name
                storage[name] = nbytes(owner)
    return _ValueStorage(own, storage, parent, strided)


def _is_contiguous(node: fx.Node) -> bool:
    """Whether a node's value is laid out contiguously (unknown counts as contiguous)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return True
    try:
        return bool(val.is_contiguous())
    except Exception:  # a stride the symbolic sizes cannot decide
        return True


class MemoryReplay:
    """Replays programs over one set of split graphs; reusable, so that a schedule search
    can measure many candidate program sets while sizes and working sets are worked out
    once (`program_memory` is the one-shot form)."""

    def __init__(self, graphs: StageGraphs) -> None:
        self.graphs = graphs
        self._workspaces: Dict[Tuple[int, str], _GroupWorkspace] = {}
        self._values = _value_storage(graphs)
        self._inputs = set(graphs.input_names)
        self._keep = {a for a in graphs.output_args if isinstance(a, str)}
        self._bytes: Dict[Tuple[Tuple[Tuple[str, int], ...], str, str], float] = {}  # (sizes, table, name)

    def _workspace(self, key: Tuple[int, str]) -> _GroupWorkspace:
        if key not in self._workspaces:
            self._workspaces[key] = _GroupWorkspace(self.graphs.groups[key])
        return self._workspaces[key]

    def __call__(self, programs: ProgramSet, microbatch_sizes: Sequence[Sizes]) -> List[RankMemory]:
        """Peak bytes of every rank running ``programs`` on micro-batches of
        ``microbatch_sizes`` (``atoms``, ``edges``, ``structures`` per micro-batch)."""
        from janus_compile.runtime.program import all_send_releases

        graphs, inputs, keep = self.graphs, self._inputs, self._keep
        size_keys = [tuple(sorted(s.items())) for s in microbatch_sizes]
        cache, values = self._bytes, self._values

        def nbytes_of(mb: int, name: str, table: str = "own") -> float:
            key = (size_keys[mb], table, name)
            value = cache.get(key)
            if value is None:
                value = cache[key] = _float(getattr(values, table).get(name, 0), microbatch_sizes[mb])
            return value

        releases = all_send_releases(programs)
        result = []
        for program in programs.programs:
            actions = program.actions
            last = last_uses(graphs, program)
            limits = prefetch_limits(program)
            released_at = {snd: r for r, sends in releases[program.rank].items() for snd in sends}
            # held values -> the storage they keep alive; a storage counts while any holds it
            storage_of: Dict[Tuple[int, str], Tuple[int, str]] = {}
            refs: Dict[Tuple[int, str], int] = {}
            storage_bytes: Dict[Tuple[int, str], float] = {}
            # sent values, released when the send is waited for (a pending send keeps its tensor)
            waits: Dict[int, List[Tuple[int, str]]] = {}
            posted: Dict[int, float] = {}  # Recv index -> bytes of its buffers, once posted
            totals = [0.0, 0.0]  # held, posted
            next_post = 0
            peak = held_peak = work_peak = 0.0
            peak_at = 0

            def hold(item: Tuple[int, str], store: Tuple[int, str], b: float) -> None:
                if item in storage_of:
                    return
                storage_of[item] = store
                refs[store] = refs.get(store, 0) + 1
                if refs[store] == 1:
                    storage_bytes[store] = b
                    totals[0] += b

            def release(item: Tuple[int, str]) -> None:
                store = storage_of.pop(item, None)
                if store is None:
                    return
                refs[store] -= 1
                if refs[store] == 0:
                    del refs[store]
                    totals[0] -= storage_bytes.pop(store)

            def post_until(limit: int) -> None:
                nonlocal next_post
                while next_post <= min(limit, len(actions) - 1):
                    a = actions[next_post]
                    if isinstance(a, Recv):
                        b = sum(nbytes_of(a.mb, t) for t in a.tensors)
                        posted[next_post] = b
                        totals[1] += b
                    next_post += 1

            for k, action in enumerate(actions):
                work = 0.0
                if isinstance(action, Compute):
                    post_until(limits[k])
                    key = (action.chunk, action.phase)
                    work = self._workspace(key).peak(microbatch_sizes[action.mb])
                    work_peak = max(work_peak, work)
                    reads = graphs.inputs[key]
                elif isinstance(action, Recv):
                    post_until(k)
                    totals[1] -= posted.pop(k, 0.0)
                    for t in action.tensors:  # a fresh buffer of the value's own size
                        hold((action.mb, t), (action.mb, t), nbytes_of(action.mb, t))
                    reads = ()
                elif isinstance(action, Send):
                    reads = action.tensors
                    for t in action.tensors:
                        if t in values.strided:  # the executor sends a contiguous copy
                            copy = (action.mb, f"{t} sent at {k}")
                            hold(copy, copy, nbytes_of(action.mb, t))
                            waits.setdefault(released_at.get(k, len(actions)), []).append(copy)
                else:
                    continue
                now = totals[0] + totals[1]
                if now + work > peak:
                    peak, peak_at = now + work, k
                if isinstance(action, Compute):
                    for name in graphs.outputs[key]:
                        if name in inputs:
                            continue
                        item, source = (action.mb, name), values.parent.get(name)
                        if source is None:
                            hold(item, item, nbytes_of(action.mb, name, "storage"))
                        elif (action.mb, source) in storage_of:  # shares a storage held here
                            hold(item, storage_of[(action.mb, source)], 0.0)
                        # else: a view of a graph input (parameters, batch): not counted
                for name in reads:
                    item = (action.mb, name)
                    if last.get(item) == k and name not in keep:
                        if isinstance(action, Send) and name not in values.strided:
                            # the pending send holds it until it is waited for
                            waits.setdefault(released_at.get(k, len(actions)), []).append(item)
                        else:
                            release(item)
                for item in waits.pop(k, ()):  # waited for at this receive
                    release(item)
                now = totals[0] + totals[1]
                held_peak = max(held_peak, now)
                if now > peak:
                    peak, peak_at = now, k
            result.append(RankMemory(program.rank, peak, peak_at, held_peak, work_peak))
        return result

    def peaks(self, programs: ProgramSet, microbatch_sizes: Sequence[Sizes]) -> List[float]:
        """Peak bytes per rank (the `RankMemory.peak_bytes` of each)."""
        return [m.peak_bytes for m in self(programs, microbatch_sizes)]


def program_memory(graphs: StageGraphs, programs: ProgramSet, microbatch_sizes: Sequence[Sizes]) -> List[RankMemory]:
    """Peak bytes of every rank running ``programs`` on micro-batches of ``microbatch_sizes``
    (``atoms``, ``edges``, ``structures`` per micro-batch), as the executor holds them."""
    return MemoryReplay(graphs)(programs, microbatch_sizes)
