"""The (pp, dp, gp) device mesh: which process does what, and the groups it talks in.

Rank placement (world rank of pipeline stage p, data replica d, graph shard g):

    world = p · (dp · gp) + d · gp + g

gp is the innermost axis because its all-reduces run inside every stage, several times
per micro-batch, so gp ranks should share a node (NVLink, or one CPU socket); dp is next
(one gradient all-reduce per step); pp is outermost (point-to-point activations only).
With a 2-GPU-per-node cluster and gp = 2 every gp pair is one node.

Groups, built with torch.distributed's DeviceMesh:

- ``gp``: ranks with the same (p, d); the graph-parallel sums inside the stage graphs;
- ``sync``: ranks with the same g, i.e. the flattened (pp, dp) sub-mesh; parameter
  gradients are summed over it once per step (each gradient is computed on one pipeline
  stage and every replica, so the sum is the whole batch's gradient on every rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.distributed as dist

MESH_DIMS: Tuple[str, str, str] = ("pp", "dp", "gp")


def world_rank(pp_rank: int, dp_rank: int, gp_rank: int, dp: int, gp: int) -> int:
    """World rank of a mesh coordinate (see the module docstring)."""
    return (pp_rank * dp + dp_rank) * gp + gp_rank


def mesh_coordinate(rank: int, dp: int, gp: int) -> Tuple[int, int, int]:
    """(pp, dp, gp) coordinate of a world rank."""
    return rank // (dp * gp), (rank // gp) % dp, rank % gp


@dataclass
class ParallelMesh:
    """This process's place in the (pp, dp, gp) mesh and the groups it uses."""

    sizes: Tuple[int, int, int]
    coordinate: Tuple[int, int, int]
    peers: List[int]  # world rank of every pipeline stage in this (dp, gp) slice
    gp_group: Optional[dist.ProcessGroup]
    sync_group: Optional[dist.ProcessGroup]

    @property
    def pp_rank(self) -> int:
        return self.coordinate[0]

    @property
    def dp_rank(self) -> int:
        return self.coordinate[1]

    @property
    def gp_rank(self) -> int:
        return self.coordinate[2]


def init_parallel_mesh(pp: int, dp: int, gp: int, device_type: str = "cpu") -> ParallelMesh:
    """Build the mesh on an initialised default process group (every rank must call it)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world != pp * dp * gp:
        raise ValueError(f"a ({pp}, {dp}, {gp}) mesh needs {pp * dp * gp} processes, but the world has {world}")
    mesh = init_device_mesh(device_type, (pp, dp, gp), mesh_dim_names=MESH_DIMS)
    p, d, g = (int(c) for c in mesh.get_coordinate())
    assert world_rank(p, d, g, dp, gp) == dist.get_rank(), "DeviceMesh placement differs from world_rank()"
    peers = [world_rank(q, d, g, dp, gp) for q in range(pp)]
    gp_group = mesh.get_group("gp") if gp > 1 else None
    sync_group = None
    if pp * dp > 1:
        # its own communicator even when it spans the world: its async all-reduces then
        # never share one with the pipeline's point-to-point messages
        sync_group = mesh["pp", "dp"]._flatten("pp_dp").get_group()
    return ParallelMesh((pp, dp, gp), (p, d, g), peers, gp_group, sync_group)
