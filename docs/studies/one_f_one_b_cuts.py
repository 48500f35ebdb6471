"""1F1B's cuts searched (docs/benchmarks.md, section B12): the simulated 1F1B rows of a
bench JSON done again on the searched cuts (`passes/unfolded_cuts.py`), beside the DP's
cuts the JSON was made with, and the wavek/1f1b ratios restated.

WaveK, Hanayo and GPipe do not depend on 1F1B's split, so their steps are read from the
JSON. Each (model, P) is captured again at the JSON's blocks and priced from its cost
file; the DP's 1F1B step must reproduce the JSON's (checked, to 1e-9), which shows the
graph and costs are the ones the bench used. `wavek@1f1b-mem` (WaveK under 1F1B's
memory) is not redone: its budget would change with the split.

    python docs/studies/one_f_one_b_cuts.py docs/data/sim_h200_b11_p4_16.json --out b12.json
    python docs/studies/one_f_one_b_cuts.py docs/data/sim32_h200_b10.json --out b12_32.json
"""
import argparse
import json
import logging
import os
import time
from statistics import mean

from janus_compile.bench import BenchConfig, _prepare_sim_model, sim_microbatches
from janus_compile.device_costs import load_device_costs
from janus_compile.passes.symfold import partition_graph
from janus_compile.passes.wavek import PipelineDAG, make_programs


def one_f_one_b_step(part, M, cfg):
    dag = PipelineDAG.from_partition(part, M, bandwidth_bytes_per_s=cfg.sim_bandwidth_gbs * 1e9, latency_s=cfg.sim_latency_us * 1e-6)
    return make_programs(dag, "1f1b").meta["simulated"]["makespan_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--stages", nargs="*", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--ilp-time", type=float, default=None,
        help="the ILP time limit the split is given (default: the JSON's); the unfolded split solves no ILP, so this sets only the cut search's budget (unfolded_cuts.BUDGET_ILP_LIMITS limits)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("janus_compile.passes.unfolded_cuts").setLevel(logging.INFO)
    src = json.load(open(args.bench_json))
    cfg = BenchConfig(**src["config"])
    ilp_time = args.ilp_time or cfg.sim_ilp_time_s
    costs_file = src["simulated"]["costs"]["file"]
    if not os.path.exists(costs_file):  # the JSON names the file where it ran
        costs_file = os.path.join("docs", "data", os.path.basename(costs_file))
    costs = load_device_costs(costs_file)
    groups = {}
    for row in src["simulated"]["rows"]:
        if (args.models is None or row["model"] in args.models) and (args.stages is None or row["stages"] in args.stages):
            groups.setdefault((row["model"], row["stages"], row["layers"]), []).append(row)
    out = []
    for (model, P, layers), rows in groups.items():
        t0 = time.perf_counter()
        sm = _prepare_sim_model(cfg, model, layers, sim_microbatches(cfg), costs["models"][model], costs["scales"][model])
        split = dict(node_times=sm.node_times, sizes=sm.sizes, time_limit_s=ilp_time, bandwidth_bytes_per_s=cfg.sim_bandwidth_gbs * 1e9)
        dp = partition_graph(sm.joint.gm, P, 1, "unfolded", search_cuts=False, **split)
        t1 = time.perf_counter()
        searched = partition_graph(sm.joint.gm, P, 1, "unfolded", **split)
        search_s = time.perf_counter() - t1
        for row in rows:
            M = row["microbatches"]
            before, after = one_f_one_b_step(dp, M, cfg), one_f_one_b_step(searched, M, cfg)
            recorded = row["schedules"]["1f1b"]["makespan_s"]
            if abs(before - recorded) > 1e-9 * recorded:
                raise SystemExit(f"{model} P={P} M={M}: the DP's 1F1B step {before} is not the JSON's {recorded}: another graph or cost file")
            w = row["schedules"]["wavek"]["makespan_s"]
            h = row["schedules"]["hanayo"]["makespan_s"]
            r = {
                "model": model, "stages": P, "microbatches": M, "layers": layers,
                "1f1b_dp_s": before, "1f1b_searched_s": after, "wavek_s": w, "hanayo_s": h,
                "wavek/1f1b_dp": before / w, "wavek/1f1b_searched": after / w, "wavek/hanayo": h / w,
                "imbalance_dp": dp.imbalance(), "imbalance_searched": searched.imbalance(), "search_s": search_s,
            }
            out.append(r)
            print(
                f"{model} P={P} M={M}: 1F1B {before * 1e3:.1f} -> {after * 1e3:.1f} ms ({after / before - 1:+.1%}); "
                f"wavek/1f1b {r['wavek/1f1b_dp']:.2f} -> {r['wavek/1f1b_searched']:.2f}; wavek/hanayo {r['wavek/hanayo']:.2f} "
                f"(max/mean {dp.imbalance():.3f} -> {searched.imbalance():.3f}; search {search_s:.0f} s, all {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"source": args.bench_json, "rows": out}, f, indent=1)
    if out:
        print(
            f"mean of {len(out)} rows: wavek/1f1b {mean(r['wavek/1f1b_dp'] for r in out):.2f} -> {mean(r['wavek/1f1b_searched'] for r in out):.2f}, "
            f"wavek/hanayo {mean(r['wavek/hanayo'] for r in out):.2f}"
        )


if __name__ == "__main__":
    main()
