"""Pipeline program IR: what each rank does in one training step, in order.

A schedule (``passes/wavek.py``) is lowered to one `RankProgram` per pipeline rank: a
flat list of actions that the executor runs top to bottom. Keeping the program explicit
(instead of re-deriving the order inside the runtime) means that what the validator
checked, what the simulator timed and what a user reads in the dump are exactly what
runs.

Actions:

- `Compute(chunk, phase, mb)`: run group ``(chunk, phase)`` for micro-batch ``mb``;
- `Send(tensors, dst, chunk, phase, mb)`: asynchronous send of values produced by group
  ``(chunk, phase)`` for micro-batch ``mb`` to rank ``dst``;
- `Recv(tensors, src, chunk, phase, mb)`: blocking receive of the values group
  ``(chunk, phase)`` on rank ``src`` produced for micro-batch ``mb``.

Send and Recv both name the *producing* group and micro-batch, so that the pair
(channel ``src → dst``, tag ``(chunk, phase, mb)``) identifies a message uniquely: one
message per producer group, micro-batch and destination rank, whatever the number of
consumer groups on that rank.

- `GradSync()`: reduce parameter gradients over data-parallel replicas;
- `OptimizerStep()`: apply the optimizer once all micro-batches are done.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, List, Tuple, Union

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Compute:
    """Run group (chunk, phase) on micro-batch mb."""

    chunk: int
    phase: str
    mb: int
    op: ClassVar[str] = "compute"

    @property
    def group(self) -> Tuple[int, str]:
        return (self.chunk, self.phase)

    def render(self) -> str:
        return f"compute(chunk={self.chunk}, phase={json.dumps(self.phase)}, mb={self.mb})"


@dataclass(frozen=True)
class Send:
    """Asynchronous send of the values group (chunk, phase) produced for mb, to rank dst."""

    tensors: Tuple[str, ...]
    dst: int
    chunk: int
    phase: str
    mb: int
    op: ClassVar[str] = "send"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))

    @property
    def tag(self) -> Tuple[int, str, int]:
        return (self.chunk, self.phase, self.mb)

    def render(self) -> str:
        return (
            f"send({json.dumps(list(self.tensors))}, dst={self.dst}, "
            f"group=({self.chunk}, {json.dumps(self.phase)}), mb={self.mb})"
        )


@dataclass(frozen=True)
class Recv:
    """Blocking receive of the values group (chunk, phase) on rank src produced for mb."""

    tensors: Tuple[str, ...]
    src: int
    chunk: int
    phase: str
    mb: int
    op: ClassVar[str] = "recv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))

    @property
    def tag(self) -> Tuple[int, str, int]:
        return (self.chunk, self.phase, self.mb)

    def render(self) -> str:
        return (
            f"recv({json.dumps(list(self.tensors))}, src={self.src}, "
            f"group=({self.chunk}, {json.dumps(self.phase)}), mb={self.mb})"
        )


@dataclass(frozen=True)
class GradSync:
    """All-reduce parameter gradients over the data-parallel group (no-op without DP)."""

    op: ClassVar[str] = "grad_sync"

    def render(self) -> str:
        return "grad_sync()"


@dataclass(frozen=True)
class OptimizerStep:
    """Apply the optimizer to this rank's parameters."""

    op: ClassVar[str] = "optimizer_step"

    def render(self) -> str:
        return "optimizer_step()"


Action = Union[Compute, Send, Recv, GradSync, OptimizerStep]
_BY_OP = {cls.op: cls for cls in (Compute, Send, Recv, GradSync, OptimizerStep)}


def action_to_dict(action: Action) -> Dict[str, Any]:
    """JSON-native form: ``{"op": ..., fields...}`` (tuples become lists)."""
    out: Dict[str, Any] = {"op": action.op}
    for name in getattr(action, "__dataclass_fields__", {}):
        value = getattr(action, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def action_from_dict(data: Dict[str, Any]) -> Action:
    data = dict(data)
    op = data.pop("op")
    if op not in _BY_OP:
        raise ValueError(f"unknown action op {op!r}; known: {sorted(_BY_OP)}")
    cls = _BY_OP[op]
    if "tensors" in data:
        data["tensors"] = tuple(data["tensors"])
    return cls(**data)


@dataclass
class RankProgram:
    """The ordered actions of one pipeline rank for one training step."""

    rank: int
    actions: List[Action] = field(default_factory=list)

    def computes(self) -> List[Compute]:
        return [a for a in self.actions if isinstance(a, Compute)]


@dataclass
class ProgramSet:
    """One program per rank plus metadata (schedule name, DAG description, simulated time).

    ``meta`` must be JSON-native (dicts, lists, strings, numbers) so that a round trip
    through `to_json`/`from_json` gives back an equal object.
    """

    stages: int
    programs: List[RankProgram]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ranks = [p.rank for p in self.programs]
        if ranks != list(range(self.stages)):
            raise ValueError(f"expected one program per rank 0..{self.stages - 1}, got ranks {ranks}")

    def program(self, rank: int) -> RankProgram:
        return self.programs[rank]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "stages": self.stages,
            "meta": self.meta,
            "programs": [{"rank": p.rank, "actions": [action_to_dict(a) for a in p.actions]} for p in self.programs],
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ProgramSet":
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"program format version {version} is not supported (this build reads {FORMAT_VERSION})")
        programs = [RankProgram(p["rank"], [action_from_dict(a) for a in p["actions"]]) for p in data["programs"]]
        return cls(data["stages"], programs, data.get("meta", {}))

    def to_json(self, indent: Union[int, None] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ProgramSet":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json(indent=1))
        log.info("wrote %d rank programs to %s", self.stages, path)

    @classmethod
    def load(cls, path: str) -> "ProgramSet":
        with open(path) as f:
            return cls.from_json(f.read())


def render_python(program: RankProgram, header: Iterable[str] = ()) -> str:
    """A readable listing of one rank's program: valid Python, one call per action.

    Send/recv name the producing group, e.g.
    ``recv(["mm_23", "add_15"], src=0, group=(1, "F"), mb=3)``.
    """
    n_compute = sum(isinstance(a, Compute) for a in program.actions)
    n_msgs = sum(isinstance(a, (Send, Recv)) for a in program.actions)
    lines = [f"# rank {program.rank}: {len(program.actions)} actions ({n_compute} computes, {n_msgs} sends/recvs)"]
    lines += [f"# {h}" for h in header]
    lines += [a.render() for a in program.actions]
    return "\n".join(lines) + "\n"


def send_releases(programs: ProgramSet, rank: int) -> Dict[int, List[int]]:
    """Recv action index -> Send action indices of ``rank`` that are surely delivered once
    that receive has completed.

    Why: gloo reports a point-to-point send complete only when it is waited for, so a
    polling runtime would keep every sent tensor alive to the end of the step. Waiting is
    safe (it returns at once) when the data has provably arrived: rank ``r`` received our
    send at its Recv ``i`` and, later in its program, sends us a message; once we have
    received *that* one, ``r`` had passed ``i``. Sends with no such answer are waited for
    at the end of the step, as before.
    """
    return all_send_releases(programs)[rank]


def all_send_releases(programs: ProgramSet) -> List[Dict[int, List[int]]]:
    """`send_releases` of every rank at once, in O(actions · log actions)."""
    import bisect

    position: Dict[Tuple[int, int, int], int] = {}  # (src, dst, n-th message) -> action index at dst
    sent: Dict[Tuple[int, int, int], int] = {}  # (src, dst, n-th message) -> action index at src
    for prog in programs.programs:
        count: Dict[Tuple[int, int], int] = {}
        for k, a in enumerate(prog.actions):
            if isinstance(a, Send):
                n = count.get((prog.rank, a.dst), 0)
                count[(prog.rank, a.dst)] = n + 1
                sent[(prog.rank, a.dst, n)] = k
            elif isinstance(a, Recv):
                n = count.get((a.src, prog.rank), 0)
                count[(a.src, prog.rank)] = n + 1
                position[(a.src, prog.rank, n)] = k
    # per (peer -> us) channel, in message order: the peer's send index and our receive
    # index both grow with n, so "the first answer sent after i and received after k" is
    # the later of two bisections
    answers: Dict[Tuple[int, int], Tuple[List[int], List[int]]] = {}  # (peer, us) -> (theirs, ours)
    for (src, dst, n), k_src in sorted(sent.items()):
        if (src, dst, n) in position:
            theirs, ours = answers.setdefault((src, dst), ([], []))
            theirs.append(k_src)
            ours.append(position[(src, dst, n)])
    releases: List[Dict[int, List[int]]] = [{} for _ in programs.programs]
    for (src, dst, n), k_send in sorted(sent.items()):
        if (src, dst, n) not in position or (dst, src) not in answers:
            continue
        received_at = position[(src, dst, n)]
        theirs, ours = answers[(dst, src)]
        j = max(bisect.bisect_right(theirs, received_at), bisect.bisect_right(ours, k_send))
        if j < len(ours):
            releases[src].setdefault(ours[j], []).append(k_send)
    return releases
