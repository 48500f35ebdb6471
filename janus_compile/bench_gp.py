"""`januspipe gp-bench`: memory and step time of graph parallelism on one large structure.

For every gp size the same model trains (gradients only, no update) on one large EMT
supercell with gp local processes, each holding all atoms and 1/gp of the edges. It
reports, per gp size, the median step time and each rank's measured peak memory: the
process's resident high-water mark while training and what training added on top of
the loaded worker (``VmHWM`` after a reset, Linux), next to the estimated bytes of the
edge and atom tensors the joint graph produces on one rank (symbolic shapes evaluated
at the rank's sizes). The edge part should fall as 1/gp; the atom part stays.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .arg_checks import check_output_folder

log = logging.getLogger(__name__)


@dataclass
class GPBenchConfig:
    model: str = "schnet"
    hidden: int = 32
    layers: int = 2
    cutoff: float = 5.0
    atoms: int = 20000
    graph_parallel: Sequence[int] = (1, 2, 4)
    steps: int = 3
    dtype: str = "float32"
    seed: int = 0
    json_path: Optional[str] = None
    rows: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("atoms", "steps", "layers", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} (--{name})")
        if not self.graph_parallel or min(self.graph_parallel) < 1:
            raise ValueError(f"graph_parallel sizes must be >= 1, got {list(self.graph_parallel)} (--graph-parallel, e.g. 1,2,4)")


def parse_gp_sizes(text: str) -> Tuple[int, ...]:
    """``--graph-parallel 1,2,4`` as a tuple of sizes."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--graph-parallel {text!r}: give comma-separated integers, e.g. 1,2,4") from None


def _graph_bytes(joint, sizes: Dict[str, int]) -> Dict[str, float]:
    """Bytes of all per-edge and all other tensors the joint graph produces at these sizes
    (every node's output once: an upper bound on what is live, the same for every gp)."""
    from .passes.cost import nbytes
    from .passes.fake_inputs import NAMED_SYMBOLS
    from .passes.gp import is_edge_tensor

    subs = {NAMED_SYMBOLS[k]: v for k, v in sizes.items()}
    edge = other = 0.0
    for node in joint.gm.graph.nodes:
        if node.op != "call_function" or "shape" not in node.meta:
            continue
        b = float(nbytes(node).xreplace(subs))
        if is_edge_tensor(node):
            edge += b
        else:
            other += b
    return {"edge_bytes": edge, "other_bytes": other}


def run_gp_bench(cfg: GPBenchConfig, progress: bool = True) -> List[Dict[str, Any]]:
    from .bench import DTYPES, build_bench_model, capture_worker_results
    from .compiled import size_values_from_batch
    from .data import atoms_to_batch, large_structure
    from .data.collate import edge_shard
    from .losses import EnergyForceLoss
    from .pipeline import PipelineTrainer

    structure = large_structure(cfg.atoms, seed=cfg.seed)
    batch = atoms_to_batch([structure], cutoff=cfg.cutoff, dtype=DTYPES[cfg.dtype])
    if progress:
        print(f"{cfg.model}: one Cu supercell, {batch.num_atoms} atoms, {batch.num_edges} edges (cutoff {cfg.cutoff} Å)")
    loss = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)
    rows = []
    for gp in cfg.graph_parallel:
        model = build_bench_model(cfg.model, cfg.hidden, cfg.layers, cfg.cutoff, cfg.dtype, cfg.seed)
        trainer = PipelineTrainer(model, batch, loss=loss, stages=1, microbatches=1, graph_parallel=gp, calibrate=False, timeout_s=3600)
        with capture_worker_results() as captured:
            trainer.train([batch], epochs=cfg.steps, lr=0.0)
        results = captured[-1]
        local = edge_shard(batch, 0, gp) if gp > 1 else batch
        est = _graph_bytes(trainer.joint, size_values_from_batch(local))
        mem = [r["bench_maxrss_kb"] for r in results]
        row = {
            "gp": gp,
            "atoms": batch.num_atoms,
            "edges_per_rank": local.num_edges,
            "step_s_median": statistics.median(trainer.step_times),
            "step_s_all": list(trainer.step_times),
            "peak_mb_max": max(m["peak"] for m in mem) / 1024,
            "added_mb_max": max(m["peak"] - m["before"] for m in mem) / 1024,
            "est_edge_mb": est["edge_bytes"] / 2**20,
            "est_other_mb": est["other_bytes"] / 2**20,
            "losses": None,
        }
        rows.append(row)
        if progress:
            print(
                f"gp={gp}: median step {row['step_s_median']:.2f} s, peak RSS {row['peak_mb_max']:.0f} MB/rank "
                f"(+{row['added_mb_max']:.0f} MB training), estimated edge tensors {row['est_edge_mb']:.0f} MB/rank"
            )
    cfg.rows = rows
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    base = rows[0]
    lines = [
        "| gp | atoms | edges/rank | median step (s) | speed-up | peak RSS/rank (MB) | added by training/rank (MB) | vs gp=1 | est. edge tensors/rank (MB) | est. atom/other tensors/rank (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gp']} | {r['atoms']} | {r['edges_per_rank']} | {r['step_s_median']:.2f} | "
            f"{base['step_s_median'] / r['step_s_median']:.2f}x | {r['peak_mb_max']:.0f} | {r['added_mb_max']:.0f} | "
            f"{r['added_mb_max'] / base['added_mb_max']:.2f} | {r['est_edge_mb']:.0f} | {r['est_other_mb']:.0f} |"
        )
    return "\n".join(lines)


def add_gp_bench_args(p) -> None:
    p.add_argument("--atoms", type=int, default=20000, help="atoms in the supercell (at least)")
    p.add_argument("--graph-parallel", default="1,2,4", help="comma-separated gp sizes to run")
    p.add_argument("--steps", type=int, default=3, help="steps per gp size (the median is reported)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON here")


def main(args) -> int:
    check_output_folder(args.json_path, "--json")
    cfg = GPBenchConfig(
        model=args.model, hidden=args.hidden, layers=args.layers, cutoff=args.cutoff, atoms=args.atoms,
        graph_parallel=parse_gp_sizes(args.graph_parallel), steps=args.steps, dtype=args.dtype,
        seed=args.seed, json_path=args.json_path,
    )
    rows = run_gp_bench(cfg)
    print(markdown(rows))
    return 0
