"""WaveK's split given the search 1F1B's got (docs/benchmarks.md, section B12b): does
moving SymFold's chunk boundaries by simulated WaveK step shorten WaveK as moving the
DP's cuts shortened 1F1B (`passes/unfolded_cuts.py`)? If it did, the comparison of B12
would favour 1F1B.

For each (model, P) of a bench JSON and each K WaveK kept there, the model is captured
again at the JSON's blocks, priced from its cost file and split as the bench split it
(SymFold, the JSON's ILP time limit); whether that split's WaveK step reproduces the
JSON's is printed (the ILP stops on wall time, so it may not). Then coordinate descent
moves each chunk boundary by up to three units (`unfolded_cuts.descend_cuts`), scored by WaveK's list-scheduling search
at M = 2P (caps up to min(M, 3P), no memory budget, no forward-backward: a cheap proxy),
until no move helps or ``--budget`` seconds are spent. Both splits are then scheduled
as the bench's `wavek` row is (the memory budget of an 80 GB device, forward-backward)
at every M of the JSON.

    python docs/studies/folded_cuts_search.py docs/data/sim_h200_b11_p4_16.json --models painn --stages 8
"""
import argparse
import dataclasses
import json
import logging
import os
import time

from janus_compile.bench import AUTO_MEMORY_FRACTION, BenchConfig, _prepare_sim_model, sim_microbatches
from janus_compile.device_costs import load_device_costs
from janus_compile.passes.memory import MemoryReplay
from janus_compile.passes.replicate import choose_replicated
from janus_compile.passes.symfold import folded_plan, partition_graph
from janus_compile.passes.unfolded_cuts import cuts_of, descend_cuts, piece_of
from janus_compile.passes.wavek import MAX_IN_FLIGHT_PER_STAGE, PipelineDAG, make_programs, wavek_search
from janus_compile.runtime.executor import StageGraphs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--stages", nargs="*", type=int, default=None)
    ap.add_argument("--budget", type=float, default=600.0, help="seconds of descent per (model, P, K)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = json.load(open(args.bench_json))
    cfg = BenchConfig(**src["config"])
    costs_file = src["simulated"]["costs"]["file"]
    if not os.path.exists(costs_file):  # the JSON names the file where it ran
        costs_file = os.path.join("docs", "data", os.path.basename(costs_file))
    costs = load_device_costs(costs_file)
    bw, lat = cfg.sim_bandwidth_gbs * 1e9, cfg.sim_latency_us * 1e-6
    groups = {}
    for row in src["simulated"]["rows"]:
        if (args.models is None or row["model"] in args.models) and (args.stages is None or row["stages"] in args.stages):
            groups.setdefault((row["model"], row["stages"], row["layers"]), []).append(row)
    out = []
    for (model, P, layers), rows in groups.items():
        sm = _prepare_sim_model(cfg, model, layers, sim_microbatches(cfg), costs["models"][model], costs["scales"][model])
        budget_bytes = AUTO_MEMORY_FRACTION * cfg.sim_memory_gb * 1e9 - sm.state_bytes
        for K in sorted({r["schedules"]["wavek"]["chunks"] for r in rows if r["schedules"]["wavek"]["chunks"] > 1}):
            part = partition_graph(sm.joint.gm, P, K, "symfold", node_times=sm.node_times, sizes=sm.sizes, time_limit_s=cfg.sim_ilp_time_s, bandwidth_bytes_per_s=bw)
            if part.problem.order != "chain":
                print(f"{model} P={P} K={K}: the split left the chain order; skipped", flush=True)
                continue
            # the values partition_graph replicates (replicate="auto"): chosen on the graph,
            # not the split, so a moved boundary copies them for its new readers too
            n = len(part.chunk_of_unit)
            replicated = choose_replicated(sm.joint.gm.graph, sm.node_times, part.out_bytes, bw)

            def build(cuts, modules=False, part=part, n=n, replicated=replicated):
                cou = piece_of(cuts, n)
                plan, nt, ob, reps = folded_plan(sm.joint.gm, part.units, cou, P * K, replicated, sm.node_times, part.out_bytes, modules)
                return dataclasses.replace(part, plan=plan, node_times=nt, out_bytes=ob, replicas=reps, chunk_of_unit=cou, solution=None)

            def proxy(cuts, M=2 * P):
                dag = PipelineDAG.from_partition(build(cuts), M, bandwidth_bytes_per_s=bw, latency_s=lat)
                return wavek_search(dag, max_in_flight=min(M, MAX_IN_FLIGHT_PER_STAGE * P), improve=False).makespan

            def wavek_row(p, M):
                dag = PipelineDAG.from_partition(p, M, bandwidth_bytes_per_s=bw, latency_s=lat)
                replay, msz = MemoryReplay(StageGraphs.from_plan(p.plan)), [dict(sm.sizes)] * M
                programs = make_programs(dag, "wavek", memory_budget_bytes=budget_bytes, memory_of=lambda pr: replay.peaks(pr, msz))
                return programs.meta["simulated"]["makespan_s"]

            t0 = time.perf_counter()
            start = tuple(cuts_of(part.chunk_of_unit))
            scored = {}

            def score(cuts, scored=scored):
                if cuts not in scored:
                    scored[cuts] = proxy(cuts)
                return scored[cuts]

            best, _ = descend_cuts(score, start, n, args.budget)
            search_s = time.perf_counter() - t0
            searched = build(best, True)
            for row in rows:
                M = row["microbatches"]
                before, after = wavek_row(part, M), wavek_row(searched, M)
                tried = row["schedules"]["wavek"]["tried_makespan_s"]
                recorded = tried.get(f"K={K}", tried.get(f"K={K} once"))  # "once": the split charged transfers once
                r = {
                    "model": model, "stages": P, "chunks": K, "microbatches": M, "layers": layers,
                    "wavek_ilp_s": before, "wavek_searched_s": after, "json_wavek_s": recorded,
                    "reproduces_json": recorded is not None and abs(before - recorded) <= 1e-9 * recorded,
                    "proxy_ilp_s": scored[start], "proxy_searched_s": scored[best], "cut_sets_tried": len(scored), "search_s": search_s,
                }
                out.append(r)
                print(
                    f"{model} P={P} K={K} M={M}: WaveK {before * 1e3:.2f} -> {after * 1e3:.2f} ms ({after / before - 1:+.1%}); "
                    f"reproduces the JSON: {r['reproduces_json']}; proxy at 2P {scored[start] * 1e3:.2f} -> {scored[best] * 1e3:.2f} ms, "
                    f"{len(scored)} cut sets in {search_s:.0f} s",
                    flush=True,
                )
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"source": args.bench_json, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
