"""Balance, memory and compile time of SymFold vs the `even` and `unfolded` baselines.

For each reference model: capture + joint graph on a batch of EMT structures, per-node
costs calibrated on this machine, then every partition method at P = 2, 4, 8 (K = 1,
and K = 2 for SymFold). Prints a markdown table (the one in docs/partitioning.md).

    python examples/partition_report.py [--models schnet painn nequip] [--atoms 64]
"""
import argparse
import time

import torch

import janus_compile
from janus_compile.data import atoms_to_batch, emt_dataset
from janus_compile.models import build_model
from janus_compile.passes.cost import calibrate
from janus_compile.passes.symfold import partition_graph

CONFIGS = {
    "schnet": dict(hidden=64, num_interactions=6, num_rbf=20, cutoff=4.5),
    "painn": dict(hidden=64, num_interactions=6, num_rbf=20, cutoff=4.5),
    "nequip": dict(num_interactions=4, cutoff=4.5),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CONFIGS))
    ap.add_argument("--structures", type=int, default=4)
    ap.add_argument("--atoms", type=int, default=32, help="atoms per structure")
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    structures = emt_dataset("cu-al", num_structures=args.structures, seed=1, size=args.atoms)
    print("| model | P | K | method | max/mean rank time | peak stash/rank per mb (MB) | params+opt/rank (MB) | ILP vars/cons | ILP s | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    timings = []
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, **CONFIGS[name]).train()
        batch = atoms_to_batch(structures, cutoff=CONFIGS[name]["cutoff"], dtype=torch.float32)
        compiled = janus_compile.compile(model)
        t0 = time.perf_counter()
        compiled.force_graph(batch)
        t1 = time.perf_counter()
        joint = compiled.joint_graph(batch)
        t2 = time.perf_counter()
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        sizes = {"atoms": batch.num_atoms, "edges": batch.num_edges, "structures": batch.num_structures}
        times = calibrate(joint, params, buffers, [batch], repeats=3).times(joint.gm.graph, sizes)
        t3 = time.perf_counter()
        for P in args.stages:
            for method, K in (("symfold", 1), ("symfold", 2), ("even", 1), ("unfolded", 1)):
                try:
                    s0 = time.perf_counter()
                    part = partition_graph(joint.gm, P, K, method, node_times=times, sizes=sizes, time_limit_s=30)
                    split_s = time.perf_counter() - s0
                except Exception as exc:  # report, keep going
                    print(f"| {name} | {P} | {K} | {method} | n/a: {exc} |  |  |  |  |  |")
                    continue
                mem = part.rank_memory()
                sol = part.solution
                ilp = f"{sol.num_variables}/{sol.num_constraints}" if sol is not None and method == "symfold" else "-"
                print(
                    f"| {name} | {P} | {K} | {method} | {part.imbalance():.3f} | "
                    f"{max(m['stash_per_microbatch'] for m in mem) / 1e6:.2f} | {max(m['params'] for m in mem) / 1e6:.2f} | "
                    f"{ilp} | {sol.solve_seconds if sol is not None else 0:.2f} | {sol.status if sol is not None else '-'} |",
                    flush=True,
                )
                if method == "symfold" and K == 1 and P == max(args.stages):
                    timings.append((name, t1 - t0, t2 - t1, t3 - t2, split_s, len(joint.gm.graph.nodes), len(part.units.names)))
    print("\n| model | capture s | joint s | calibrate s | SymFold ILP + split s (P=max) | joint nodes | units |")
    print("|---|---|---|---|---|---|---|")
    for row in timings:
        print(f"| {row[0]} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} | {row[4]:.1f} | {row[5]} | {row[6]} |")


if __name__ == "__main__":
    main()
