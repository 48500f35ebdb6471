"""One pipelined training step across ranks, and how its pieces are put back together."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch

from .executor import RankExecutor, StageGraphs
from .program import ProgramSet, send_releases


def run_rank_step(
    rank: int,
    world_size: int,
    graphs: StageGraphs,
    programs_json: str,
    microbatch_inputs: Sequence[Sequence[Any]],
    microbatch_sizes: Sequence[Mapping[str, int]],
    trace: bool = False,
):
    """Worker entry: run this rank's program once; returns its outputs (and trace)."""
    programs = ProgramSet.from_json(programs_json)
    if len(programs.programs) != world_size:
        raise ValueError(f"{len(programs.programs)} rank programs for a world of {world_size} processes")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    executor = RankExecutor(rank, graphs, programs.programs[rank], device, releases=send_releases(programs, rank))
    result = executor.run(microbatch_inputs, microbatch_sizes, trace=trace)
    return {"outputs": result.outputs, "trace": result.trace}


def merge_step_outputs(graphs: StageGraphs, per_rank: Sequence[Mapping[str, Any]], microbatches: int) -> List[Any]:
    """Joint-graph outputs of the whole batch: loss and gradients summed over micro-batches,
    per-structure/per-atom outputs concatenated in micro-batch order."""
    found: List[Dict[str, Any]] = [{} for _ in range(microbatches)]
    for result in per_rank:
        for mb, outs in result["outputs"].items():
            found[mb].update(outs)
    merged: List[Any] = []
    for k, arg in enumerate(graphs.output_args):
        if not isinstance(arg, str):
            merged.append(arg)
            continue
        values = [found[mb][arg] for mb in range(microbatches)]
        merged.append(values)
    return merged
