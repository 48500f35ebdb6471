"""PaiNN at P = 32, K = 2 (docs/benchmarks.md, section B10): the trainer's split against
the same SymFold cascade choosing between its candidate splits by the busiest rank's time
instead of the ILP objective (which also charges transfers), WaveK and Hanayo simulated
on both at M = P, 2P, 4P. The bench's settings: H200 costs, 48 blocks, the 30 s ILP,
links 25 GB/s and 20 µs. About 15 minutes on one core.

    python docs/studies/painn_split_by_balance.py
"""
import dataclasses
import logging

from janus_compile.bench import BenchConfig, _prepare_sim_model, sim_microbatches
from janus_compile.device_costs import load_device_costs
from janus_compile.passes import symfold
from janus_compile.passes.wavek import PipelineDAG, make_programs

P, K, BLOCKS, MICROBATCHES = 32, 2, 48, (32, 64, 128)
COSTS = "docs/data/h200_costs.json"


def split(cfg, sm, by_balance: bool):
    solve = symfold.solve_partition
    if by_balance:  # the cascade keeps a candidate when its busiest rank is faster
        symfold.solve_partition = lambda problem, **kw: dataclasses.replace(s := solve(problem, **kw), objective=max(s.rank_time))
    try:
        return symfold.partition_graph(sm.joint.gm, P, K, "symfold", node_times=sm.node_times, sizes=sm.sizes, time_limit_s=cfg.sim_ilp_time_s, bandwidth_bytes_per_s=cfg.sim_bandwidth_gbs * 1e9)
    finally:
        symfold.solve_partition = solve


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = BenchConfig(model="painn", large=1000, real=False, simulate=True, sim_models=["painn"], sim_stages=[P], sim_costs=COSTS)
    costs = load_device_costs(COSTS)
    sm = _prepare_sim_model(cfg, "painn", BLOCKS, sim_microbatches(cfg), costs["models"]["painn"], costs["scales"]["painn"])
    parts = {name: split(cfg, sm, name == "by balance") for name in ("trainer", "by balance")}
    for name, p in parts.items():
        print(f"{name}: max/mean rank time {p.imbalance():.3f}, transfers charged {p.problem.transfer_charge}", flush=True)
    for M in MICROBATCHES:
        for name, p in parts.items():
            dag = PipelineDAG.from_partition(p, M, bandwidth_bytes_per_s=cfg.sim_bandwidth_gbs * 1e9, latency_s=cfg.sim_latency_us * 1e-6)
            cells = []
            for s in ("wavek", "hanayo"):
                sim = make_programs(dag, s, **({"memory_budget_bytes": 1e18} if s == "wavek" else {})).meta["simulated"]
                cells.append(f"{s} {sim['makespan_s'] * 1e3:.1f} ms, efficiency {sim['efficiency']:.3f} (bound {sim['efficiency_bound']:.3f})")
            print(f"M={M} {name}: " + " | ".join(cells), flush=True)
