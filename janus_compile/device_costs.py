"""`januspipe calibrate`: per-op cost models timed on one device, for simulating elsewhere.

The simulated study of `januspipe bench --simulate` (P up to 32) needs node costs of the
device the pipeline would train on, but partitioning and simulating 32 stages takes CPU
time, not that device. This command times every node of each reference model's joint
graph on the device at hand (``passes.cost.calibrate``: per aten op class, seconds per
FLOP, per byte and per node) and writes the fitted cost models as one JSON file;
``bench --simulate --sim-costs FILE`` then prices the (possibly deeper) models with them
on any machine. The fit is per op, not per node, so it carries over to the same model
with more interaction blocks.

Per-node timing synchronises the device after every node (on CUDA), so each node also
pays one synchronisation; the file records, per model, the whole graph run without them
beside the sum of the per-node times (``whole_graph_s`` / ``sum_of_nodes_s``), so that
bias is measured, not guessed.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .arg_checks import check_device, check_output_folder

log = logging.getLogger(__name__)

COSTS_VERSION = 1


@dataclass
class CalibrateConfig:
    models: Sequence[str] = ("schnet", "painn", "nequip")
    hidden: int = 32
    layers: int = 4
    cutoff: float = 4.5
    dtype: str = "float32"
    seed: int = 0
    atoms: int = 16
    large: Optional[int] = 1000
    mb_structures: Optional[int] = None
    device: str = "cpu"
    repeats: int = 3
    whole_graph_repeats: int = 10

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.repeats < 1 or self.whole_graph_repeats < 1:
            raise ValueError("repeats must be >= 1")


def _bench_config(cfg: CalibrateConfig) -> Any:
    """The `BenchConfig` whose simulated micro-batches these costs are for."""
    from .bench import BenchConfig

    return BenchConfig(
        hidden=cfg.hidden, layers=cfg.layers, cutoff=cfg.cutoff, dtype=cfg.dtype, seed=cfg.seed, atoms=cfg.atoms,
        large=cfg.large, mb_structures=cfg.mb_structures, real=False, simulate=True, sim_models=list(cfg.models),
    )


def _time_whole_graph(joint: Any, model: torch.nn.Module, batch: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of one run of the joint graph as it is (no per-node synchronisation);
    ``model`` and ``batch`` are on ``device`` already."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    flat = joint.flat_inputs(params, buffers, batch)
    cuda = device.type == "cuda"
    times: List[float] = []
    with torch.no_grad():
        for r in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            joint.gm(*flat)
            if cuda:
                torch.cuda.synchronize(device)
            if r > 0:  # the first run warms up allocator and kernels
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate_models(cfg: CalibrateConfig, progress: bool = True) -> Dict[str, Any]:
    """Capture and calibrate every model of ``cfg`` on ``cfg.device``; the JSON-ready result."""
    import janus_compile

    from .bench import build_bench_model, sim_microbatches
    from .passes.cost import calibrate

    bcfg = _bench_config(cfg)
    device = torch.device(cfg.device)
    # captured on the device itself, so that constants the graph holds live there too
    mbs = [mb.to(device) for mb in sim_microbatches(bcfg)]
    out: Dict[str, Any] = {
        "version": COSTS_VERSION,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": cfg.dtype,
        "micro_batch": {"structures": bcfg.mb_structures, "atoms": mbs[0].num_atoms, "edges": mbs[0].num_edges},
        "models": {},
    }
    for name in cfg.models:
        t0 = time.perf_counter()
        model = build_bench_model(name, cfg.hidden, cfg.layers, cfg.cutoff, cfg.dtype, cfg.seed).to(device)
        joint = janus_compile.compile(model, mbs[0]).joint_graph(mbs[0])
        cm = calibrate(
            joint, dict(model.named_parameters()), dict(model.named_buffers()), list(mbs), device=device, repeats=cfg.repeats
        )
        whole = _time_whole_graph(joint, model, mbs[0], device, cfg.whole_graph_repeats)
        first_key = next(iter(cm.measured))
        per_node = sum(cm.measured[first_key].values())
        out["models"][name] = {
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "nodes": len(cm.measured[first_key]),
            "whole_graph_s": whole,
            "sum_of_nodes_s": per_node,
            "calibrate_s": time.perf_counter() - t0,
            "cost_model": json.loads(cm.to_json()),
        }
        if progress:
            print(
                f"  [calibrate] {name} on {device}: {len(cm.measured[first_key])} nodes, graph {whole * 1e3:.2f} ms whole, "
                f"{per_node * 1e3:.2f} ms summed per node, max phase fit error {cm.max_fit_error:.0%}",
                flush=True,
            )
    return out


def load_device_costs(path: str) -> Dict[str, Any]:
    """Read a `januspipe calibrate` file: ``{"meta": ..., "models": {name: CostModel},
    "scales": {name: whole_graph_s / sum_of_nodes_s}}``.

    The scale is what the simulation multiplies the fitted node times by, so that a
    graph's nodes sum to what the graph took when run whole: per-node timing waits for
    the device after every node, a pipeline stage does not (on an H200 a 1008-atom graph
    ran whole in about half the sum of its per-node times)."""
    from .passes.cost import CostModel

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the cost file {path!r} ({exc}); write one with `januspipe calibrate --out FILE`") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r} is not JSON ({exc}); write one with `januspipe calibrate --out FILE`") from exc
    if data.get("version") != COSTS_VERSION or "models" not in data:
        raise ValueError(f"{path!r} is not a cost file of version {COSTS_VERSION}; write one with `januspipe calibrate --out FILE`")
    models = {name: CostModel.from_json(json.dumps(entry["cost_model"])) for name, entry in data["models"].items()}
    scales = {}
    for name, entry in data["models"].items():
        whole, summed = float(entry.get("whole_graph_s", 0.0)), float(entry.get("sum_of_nodes_s", 0.0))
        scales[name] = whole / summed if whole > 0 and summed > 0 else 1.0
    meta = {k: v for k, v in data.items() if k != "models"}
    meta["scales"] = scales
    return {"meta": meta, "models": models, "scales": scales}


def check_costs_cover(
    costs: Mapping[str, Any], models: Sequence[str], micro_batch: Mapping[str, int], path: str, dtype: Optional[str] = None
) -> None:
    """Fail early when a simulated model has no cost model; warn when the costs were timed
    on micro-batches of another size (the fit extrapolates in FLOPs and bytes) or dtype."""
    missing = [m for m in models if m not in costs["models"]]
    if missing:
        have = sorted(costs["models"])
        raise ValueError(f"{path!r} holds cost models for {have}, not for {missing}: calibrate them (`januspipe calibrate --models ...`)")
    timed = costs["meta"].get("micro_batch", {})
    if timed and (timed.get("atoms"), timed.get("edges")) != (micro_batch.get("atoms"), micro_batch.get("edges")):
        log.warning(
            "costs in %s were timed on micro-batches of %s atoms / %s edges, the simulation uses %s / %s: "
            "the fit extrapolates in FLOPs and bytes",
            path, timed.get("atoms"), timed.get("edges"), micro_batch.get("atoms"), micro_batch.get("edges"),
        )
    if dtype is not None and costs["meta"].get("dtype") not in (None, dtype):
        log.warning("costs in %s were timed in %s, the simulation uses %s", path, costs["meta"]["dtype"], dtype)


def markdown(result: Mapping[str, Any]) -> str:
    lines = [
        f"cost models timed on {result['device']} ({result['device_name']}), torch {result['torch']}, {result['dtype']}, "
        f"micro-batch {result['micro_batch']['atoms']} atoms / {result['micro_batch']['edges']} edges",
        "",
        "| model | blocks | nodes | graph run whole (ms) | sum of per-node times (ms) | whole / summed |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in result["models"].items():
        ratio = e["whole_graph_s"] / e["sum_of_nodes_s"] if e["sum_of_nodes_s"] > 0 else float("nan")
        lines.append(
            f"| {name} | {e['layers']} | {e['nodes']} | {e['whole_graph_s'] * 1e3:.2f} | {e['sum_of_nodes_s'] * 1e3:.2f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def add_calibrate_args(p: Any) -> None:
    from .bench import add_reference_model_args

    add_reference_model_args(p, hidden=32)  # the simulation's width (bench --hidden)
    p.add_argument("--atoms", type=int, default=None, help="atoms per EMT structure (default 16; only with --large 0)")
    p.add_argument(
        "--large", type=int, default=1000, metavar="N",
        help="use >= N-atom Cu supercells, as bench --large (default 1000; 0: EMT structures of --atoms atoms)",
    )
    p.add_argument("--mb-structures", type=int, default=None, help="structures per micro-batch (default as bench: 2; 1 with --large)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per node (median)")
    p.add_argument("--out", required=True, help="write the cost models here (JSON), for bench --sim-costs")


def main(args: Any) -> int:
    if args.atoms is not None and args.large:
        raise ValueError(
            f"--atoms {args.atoms} sizes EMT structures, but --large {args.large} (the default) times >= {args.large}-atom "
            "supercells: add --large 0 to time EMT structures, or drop --atoms"
        )
    check_output_folder(args.out, "--out")
    cfg = CalibrateConfig(
        models=args.models, hidden=args.hidden, layers=args.layers, cutoff=args.cutoff, dtype=args.dtype, seed=args.seed,
        atoms=CalibrateConfig.atoms if args.atoms is None else args.atoms, large=args.large or None, mb_structures=args.mb_structures, device=args.device, repeats=args.repeats,
    )
    result = calibrate_models(cfg)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"wrote {args.out}")
    return 0
