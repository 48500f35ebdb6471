"""Gradient sync over the (pp, dp) ranks, bucketed and overlapped with the last backward.

Every parameter's gradient is accumulated over micro-batches as the compute actions that
produce it finish. Parameters are grouped into buckets in one fixed order (reverse of
registration, as DDP does: output layers, whose gradients the backward finishes first,
come first), the same on every rank. A bucket's all-reduce is launched (asynchronously)
as soon as every gradient in it is final on this rank, i.e. after the last compute
action of this rank's program that contributes to it; on a rank that never computes a
parameter (another pipeline stage owns it) that is at once. Buckets are launched in the
same order on every rank, which is what keeps the collectives matched, and only the
step's end waits for them, so reductions overlap the remaining backward work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .program import Compute, RankProgram

DEFAULT_BUCKET_BYTES = 25 * 2**20


def gradient_ready_at(program: RankProgram, group_outputs: Mapping[Any, Sequence[str]], grad_args: Sequence[Any]) -> List[int]:
    """For each gradient output, the index of the last compute action of ``program`` that
    produces it (-1: this rank never computes it, so it is final from the start)."""
    wanted = {arg: k for k, arg in enumerate(grad_args) if isinstance(arg, str)}
    ready = [-1] * len(grad_args)
    for index, action in enumerate(program.actions):
        if isinstance(action, Compute):
            for name in group_outputs[(action.chunk, action.phase)]:
                if name in wanted:
                    ready[wanted[name]] = index
    return ready


def make_buckets(sizes_bytes: Sequence[int], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> List[List[int]]:
    """Parameter indices in buckets of about ``bucket_bytes``, in reverse registration order."""
    buckets: List[List[int]] = [[]]
    size = 0
    for k in reversed(range(len(sizes_bytes))):
        if buckets[-1] and size + sizes_bytes[k] > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(k)
        size += sizes_bytes[k]
    return [b for b in buckets if b]


def launch_points(ready_at: Sequence[int], buckets: Sequence[Sequence[int]]) -> List[int]:
    """The action index after which each bucket is launched: when all its gradients are
    final and every earlier bucket has been launched (-1: before the first action)."""
    points, last = [], -1
    for bucket in buckets:
        last = max([last] + [ready_at[k] for k in bucket])
        points.append(last)
    return points


@dataclass
class OverlappedGradSync:
    """Accumulates one step's gradients from compute outputs and all-reduces them in
    buckets over ``group`` while the step goes on (``group=None``: no reduction)."""

    params: List[torch.Tensor]
    grad_args: List[Any]
    ready_at: List[int]
    group: Optional[dist.ProcessGroup]
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    grads: List[torch.Tensor] = field(default_factory=list)
    launched: List[Dict[str, Any]] = field(default_factory=list)  # per bucket: action index, time

    def __post_init__(self) -> None:
        self.buckets = make_buckets([p.numel() * p.element_size() for p in self.params], self.bucket_bytes)
        self.points = launch_points(self.ready_at, self.buckets)
        self._arg_index = {arg: k for k, arg in enumerate(self.grad_args) if isinstance(arg, str)}

    def start(self) -> None:
        self.grads = [torch.zeros_like(p) for p in self.params]
        self._works: List[Any] = []
        self._flats: List[torch.Tensor] = []
        self._next = 0
        self.launched = []
        self._launch_ready(-1)

    def on_compute(self, index: int, outputs: Mapping[str, torch.Tensor]) -> None:
        """Called after compute action ``index`` with the values it produced."""
        for name, value in outputs.items():
            k = self._arg_index.get(name)
            if k is not None:
                self.grads[k] += value
        self._launch_ready(index)

    def _launch_ready(self, index: int) -> None:
        import time

        while self._next < len(self.buckets) and self.points[self._next] <= index:
            bucket = self.buckets[self._next]
            flat = torch.cat([self.grads[k].reshape(-1) for k in bucket])
            if self.group is not None:
                self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))
            self._flats.append(flat)
            self.launched.append({"bucket": self._next, "after_action": index, "time": time.perf_counter()})
            self._next += 1

    def finish(self, loss: torch.Tensor) -> tuple[List[torch.Tensor], float]:
        """Wait for every bucket (and sum the loss); the step's whole-batch gradients."""
        self._launch_ready(10**12)
        loss = loss.reshape(1).clone()
        if self.group is not None:
            dist.all_reduce(loss, group=self.group)
        for w in self._works:
            w.wait()
        out: List[torch.Tensor] = list(self.grads)
        for bucket, flat in zip(self.buckets, self._flats):
            offset = 0
            for k in bucket:
                n = self.params[k].numel()
                out[k] = flat[offset : offset + n].view_as(self.params[k])
                offset += n
        return out, float(loss)
