"""Collectives that appear inside graphs: the graph-parallel sum over a rank's gp group.

The graph-parallel pass (`passes/gp.py`) inserts ``torch.ops.januspipe.gp_all_reduce``
after every reduction over sharded edges. The op names no process group: graphs are
built in the parent process and pickled to workers, where groups do not exist yet. A
worker sets its gp group once (`set_graph_parallel_group`) and every op call in that
process sums over it with a functional collective. Without a group (one process, or
calibration runs) the op is the identity, so the same graph also runs unsharded.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_GP_GROUP: Optional[dist.ProcessGroup] = None


def set_graph_parallel_group(group: Optional[dist.ProcessGroup]) -> None:
    """Sum ``gp_all_reduce`` over ``group`` in this process (``None``: identity)."""
    global _GP_GROUP
    _GP_GROUP = group


def graph_parallel_group() -> Optional[dist.ProcessGroup]:
    return _GP_GROUP


@contextlib.contextmanager
def graph_parallel(group: Optional[dist.ProcessGroup]) -> Iterator[None]:
    previous = _GP_GROUP
    set_graph_parallel_group(group)
    try:
        yield
    finally:
        set_graph_parallel_group(previous)


@torch.library.custom_op("januspipe::gp_all_reduce", mutates_args=())
def gp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over this process's graph-parallel group (a new tensor)."""
    group = _GP_GROUP
    if group is None or dist.get_world_size(group) == 1:
        return x.clone()
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))


@gp_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


GP_ALL_REDUCE = torch.ops.januspipe.gp_all_reduce.default
