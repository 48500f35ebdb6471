"""SchNet at P = 32 (docs/benchmarks.md, section B10b): how far WaveK's order is from the
best any order could do. Prints, for K = 2 and 4 and M = P, 2P, 4P, WaveK's step in the
B10 study (`tried_makespan_s` in docs/data/sim32_h200_b10.json), the bound the bench
reports (`passes.wavek.makespan_lower_bound`) and a tighter one computed here, with
their efficiencies. The splits are solved again with the bench's settings (H200 costs,
64 blocks, the 30 s ILP, links 25 GB/s and 20 µs), so their max/mean is printed to
compare with the study's. About 10 minutes on one core.

The tighter bound. A rank's tasks form a one-machine problem: task (g, k) may not start
before a release time and leaves a delivery time (the path after it) behind; the
preemptive problem, solved exactly by Jackson's rule (run the released task with the
longest delivery), bounds every schedule. The bench's bound releases every micro-batch
of g at g's head. Here the k-th micro-batch to start g (k = 0, 1, ...) waits longer: the
k + 1 micro-batches that started g all passed g's ancestors on each rank q first, which
takes rank q at least (k + 1) × their work from the earliest of their heads, and then,
from the ancestor that finished last, its longest path to g (the least of these). The same on the reversed DAG bounds the deliveries;
the larger of the two is kept. Messages' CPU cost is left out, as in the bench's bound.

    python docs/studies/schnet_order_gap.py
    python docs/studies/schnet_order_gap.py --check   # the bound against 168 schedules of random DAGs
"""
import dataclasses
import heapq
import json
import logging
import math
import random
import sys
from collections import defaultdict

from janus_compile.bench import BenchConfig, _prepare_sim_model, sim_microbatches
from janus_compile.device_costs import load_device_costs
from janus_compile.passes.symfold import partition_graph
from janus_compile.passes.wavek import PipelineDAG, _heads, _tails, make_programs, makespan_lower_bound

P, BLOCKS, CHUNKS, MICROBATCHES = 32, 64, (2, 4), (32, 64, 128)
COSTS = "docs/data/h200_costs.json"
STUDY = "docs/data/sim32_h200_b10.json"


def _longest_from(dag, u):
    """Longest path (compute + transfers) from u's start to each group reachable from u."""
    L = {u: 0.0}
    start = dag.groups.index(u)
    for g in dag.groups[start + 1:]:
        ways = [L[d] + dag.cost[d] + dag.comm_time(d, g) for d in dag.deps[g] if d in L]
        if ways:
            L[g] = max(ways)
    return L


def _releases(dag):
    """Per group, the earliest start of its k-th micro-batch, k = 0 .. M-1."""
    head, M = _heads(dag), dag.microbatches
    reach = {u: _longest_from(dag, u) for u in dag.groups}
    out = {}
    for g in dag.groups:
        by_rank = defaultdict(list)
        for u in dag.groups:
            if u != g and g in reach[u]:
                by_rank[dag.rank(u)].append((head[u], dag.cost[u], reach[u][g] - dag.cost[u]))
        rel = [head[g]] * M
        for A in by_rank.values():
            for B in [A] + ([[a] for a in A] if len(A) > 1 else []):
                h, w, d = min(a[0] for a in B), sum(a[1] for a in B), min(a[2] for a in B)
                rel = [max(rel[k], h + (k + 1) * w + d) for k in range(M)]
        out[g] = rel
    return out


def _jackson(jobs):
    """Preemptive one-machine max(end + delivery) with release times; jobs (release, work, delivery)."""
    jobs = sorted(jobs)
    t, i, heap, best = 0.0, 0, [], 0.0
    while i < len(jobs) or heap:
        if not heap:
            t = max(t, jobs[i][0])
        while i < len(jobs) and jobs[i][0] <= t:
            heapq.heappush(heap, [-jobs[i][2], jobs[i][1]])
            i += 1
        nq, p = heap[0]
        run = min(p, (jobs[i][0] if i < len(jobs) else math.inf) - t)
        t += run
        if run >= p:
            heapq.heappop(heap)
            best = max(best, t - nq)
        else:
            heap[0][1] = p - run
    return best


def _one_way(dag):
    tail, rel = _tails(dag, dag.cost), _releases(dag)
    best = max(tail.values())
    for r in range(dag.stages):
        jobs = [(rel[g][k], dag.cost[g], tail[g] - dag.cost[g]) for g in dag.groups_on(r) for k in range(dag.microbatches)]
        best = max(best, _jackson(jobs))
    return best


def tighter_bound(dag):
    return max(_one_way(dag), _one_way(dag.reversed()), makespan_lower_bound(dag))


def check_on_synthetic(cases: int = 60) -> None:
    """The tighter bound against every schedule of random uneven synthetic DAGs: it must
    never exceed a simulated makespan."""
    checked, tight = 0, 0
    for seed in range(cases):
        rnd = random.Random(seed)
        P, K = rnd.randint(1, 5), rnd.randint(1, 2)
        pc = {k: rnd.uniform(0.1, 3.0) for k in ("F", "G", "GG", "FB")}
        dag = PipelineDAG.synthetic(P, K, P * rnd.randint(1, 3), pc, boundary_bytes=1e6, bandwidth_bytes_per_s=rnd.choice([1e7, 1e8]), latency_s=rnd.choice([0.0, 0.05]))
        mult = {c: rnd.uniform(0.6, 1.5) for c in dag.rank_of_chunk}
        dag = dataclasses.replace(dag, cost={g: t * mult[g[0]] for g, t in dag.cost.items()})
        bound = tighter_bound(dag)
        for schedule in ["gpipe", "wavek"] + (["hanayo"] if P > 1 else []):
            step = make_programs(dag, schedule).meta["simulated"]["makespan_s"]
            assert bound <= step * (1 + 1e-12), (seed, schedule, bound, step)
            checked += 1
            tight += bound >= step * (1 - 1e-12)
    print(f"{checked} schedules: the bound never above the makespan, equal to it in {tight}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if "--check" in sys.argv:
        check_on_synthetic()
        sys.exit()
    cfg = BenchConfig(large=1000, real=False, simulate=True, sim_models=["schnet"], sim_stages=[P], sim_costs=COSTS)
    costs = load_device_costs(COSTS)
    rows = {r["microbatches"]: r for r in json.load(open(STUDY))["simulated"]["rows"] if r["model"] == "schnet"}
    sm = _prepare_sim_model(cfg, "schnet", BLOCKS, sim_microbatches(cfg), costs["models"]["schnet"], costs["scales"]["schnet"])
    for K in CHUNKS:
        part = partition_graph(sm.joint.gm, P, K, "symfold", node_times=sm.node_times, sizes=sm.sizes, time_limit_s=cfg.sim_ilp_time_s, bandwidth_bytes_per_s=cfg.sim_bandwidth_gbs * 1e9)
        for M in MICROBATCHES:
            dag = PipelineDAG.from_partition(part, M, bandwidth_bytes_per_s=cfg.sim_bandwidth_gbs * 1e9, latency_s=cfg.sim_latency_us * 1e-6)
            ideal = dag.total_work() / dag.stages
            step = rows[M]["schedules"]["wavek"]["tried_makespan_s"][f"K={K}"]
            old, new = makespan_lower_bound(dag), tighter_bound(dag)
            print(
                f"K={K} M={M} (max/mean {part.imbalance():.3f}, study {rows[M]['imbalance'][f'symfold K={K}']:.3f}): wavek {step * 1e3:.1f} ms, bench's bound {old * 1e3:.1f}, "
                f"tighter {new * 1e3:.1f}; efficiency {ideal / step:.3f}, bounds {ideal / old:.3f} and {ideal / new:.3f}",
                flush=True,
            )
