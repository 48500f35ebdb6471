"""`januspipe bench`: the real multi-process benchmark end to end, and the simulation."""
from __future__ import annotations

import json
import math

import pytest

from janus_compile import bench
from janus_compile.bench import COUNT_CAP, EQUAL_MEMORY, SCHEDULES, BenchConfig, markdown_sim, run_simulation, sim_averages
from janus_compile.bench_plots import simulated_charts
from janus_compile.cli import main
from janus_compile.options import JanusOptions
from janus_compile.pipeline import AUTO_CHUNKS_MARGIN

TINY = ["--hidden", "8", "--layers", "2", "--atoms", "8"]


@pytest.mark.distributed
def test_bench_real_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """P=2, M=2, one round: every schedule is timed, tabulated, compared and saved (also
    after the M, marked partial, so a run stopped later keeps it)."""
    out = tmp_path / "results.json"
    written = []
    real_write = bench.write_json
    monkeypatch.setattr(bench, "write_json", lambda path, r: (written.append(json.loads(json.dumps(r, default=str))), real_write(path, r)))
    from janus_compile.passes import group_timing

    timed_with_contenders = []
    real_timing = group_timing.measure_group_times
    monkeypatch.setattr(
        group_timing, "measure_group_times", lambda *a, **kw: (timed_with_contenders.append(kw.get("contenders", 0)), real_timing(*a, **kw))[1]
    )
    args = [
        "bench", *TINY, "--stages", "2", "--microbatches", "2", "--repeats", "1", "--steps", "1",
        "--ilp-time-limit", "4", "--out", str(out), "--plots", str(tmp_path / "bench-charts"),
    ]
    assert main(args) == 0
    assert [w.get("partial", False) for w in written] == [True, False]
    assert len(written[0]["real"]) == 1 and written[0]["real"][0]["microbatches"] == 2
    text = capsys.readouterr().out
    for s in SCHEDULES:
        assert f"| {s} |" in text, text
    assert "wavek/1f1b" in text and "wavek/hanayo" in text
    result = json.loads(out.read_text())
    (entry,) = result["real"]
    assert entry["stages"] == 2 and entry["microbatches"] == 2
    # the shared timing ran beside P - 1 processes running the same graphs, as the ranks do
    assert entry["timing_contenders"] == 1 and "groups timed together beside 1 process running the same graphs" in text
    assert 1 in timed_with_contenders  # and the timing itself was told so
    assert set(entry["schedules"]) == set(SCHEDULES) | {EQUAL_MEMORY, COUNT_CAP}
    # the plain wavek row is the trainer's default (a share of this host's memory), the
    # count-cap row holds P = 2 micro-batches in flight whatever the memory
    plain, counted = entry["schedules"]["wavek"], entry["schedules"][COUNT_CAP]
    assert plain["memory_cap_gb"] == "auto" and plain["wavek_memory_budget_bytes"] > 0
    assert counted["memory_cap_gb"] is None and counted["wavek_memory_budget_bytes"] is None
    assert max(counted["sim_peak_in_flight"]) <= 2
    assert entry["ratios"]["wavek@count-P/1f1b"] > 0 and entry["ratios"]["wavek@count-P/hanayo"] > 0
    assert f"| {COUNT_CAP} |" in text and "memory_cap_gb='auto'" in text
    # WaveK at equal memory: capped at what 1F1B's programs replay to (both rows add the same optimizer state)
    eq, base = entry["schedules"][EQUAL_MEMORY], entry["schedules"]["1f1b"]
    assert eq["memory_cap_gb"] > 0 and max(eq["est_peak_growth_mb"]) <= max(base["est_peak_growth_mb"]) * (1 + 1e-9)
    assert entry["ratios"]["wavek@1f1b-mem/1f1b"] > 0
    for s, r in entry["schedules"].items():
        assert r["ilp_time_limit_s"] == 4.0  # --ilp-time-limit reached every trainer
        assert r["step_s"]["n"] == 1 and r["step_s"]["median"] > 0
        assert r["structures_per_s"] > 0 and r["atoms_per_s"] > r["structures_per_s"]
        assert r["simulated_step_s"] > 0 and math.isfinite(r["sim_rel_error"])
        assert r["simulated_step_s_traced_costs"] > 0 and math.isfinite(r["sim_rel_error_traced_costs"])
        assert 0 <= r["sim_bubble_fraction"] < 1 and 0 < r["sim_efficiency"] <= r["sim_efficiency_bound"] * (1 + 1e-9) <= 1 + 1e-9
        assert len(r["est_memory_per_rank_mb"]) == 2
        # the workers ran through the bench's instrumentation: RSS and traces came back
        assert r["measured_peak_rss_mb"] is not None and min(r["measured_peak_rss_mb"]) > 0
        assert r["measured_compute_s"] > 0
        # one extra step per schedule with its allocations recorded, beside the replay
        assert len(r["allocated_peak_mb"]) == 2 and min(r["allocated_peak_mb"]) > 0
        assert len(r["est_allocated_peak_mb"]) == 2
        # a split solved again on measured group times is named with both simulated steps
        assert "rebalance" in r
        if r["rebalance"] and r["rebalance"]["rebalanced_simulated_step_s"] is not None:
            assert f"{s} (simulated {1e3 * r['rebalance']['simulated_step_s']:.0f} →" in text
    assert entry["schedules"]["hanayo"]["chunks"] == 2
    # GPipe and WaveK at P in flight scheduled WaveK's partitions; the others split anew on
    # 1F1B's joint graph and calibration (the capped row's cap bounds its ILP)
    assert result["config"]["reuse_plans"] is True
    assert [entry["schedules"][s]["plan_reused_from"] for s in ("1f1b", "hanayo", "wavek", "gpipe", COUNT_CAP, EQUAL_MEMORY)] == [
        None, "1f1b (M=2), graphs", "1f1b (M=2), graphs", "wavek (M=2), partitions", "wavek (M=2), partitions", "1f1b (M=2), graphs",
    ]
    assert entry["schedules"]["1f1b"]["partition"] == "unfolded"
    for k in ("wavek/1f1b", "wavek/hanayo", "wavek/gpipe"):
        assert entry["ratios"][k] > 0 and math.isfinite(entry["ratios"][k])
    # `januspipe plot` on the JSON: one bar per schedule (its throughput) and per rank;
    # `bench --plots` wrote the same charts
    assert main(["plot", str(out), "--out", str(tmp_path / "charts")]) == 0
    for name in ("real_p2_throughput.svg", "real_p2_memory_per_rank.svg"):
        assert (tmp_path / "bench-charts" / name).read_text() == (tmp_path / "charts" / name).read_text()
    svg = (tmp_path / "charts" / "real_p2_throughput.svg").read_text()
    for s in entry["schedules"]:  # six entries on a one-panel chart: the legend wraps, drops none
        assert f">{s}</text>" in svg
    bars = _svg_points(svg, "rect")
    for s, r in entry["schedules"].items():
        assert bars[s] == [pytest.approx(r["structures_per_s"], rel=1e-3)]
    memory = _svg_points((tmp_path / "charts" / "real_p2_memory_per_rank.svg").read_text(), "rect")
    assert sorted(memory["wavek"]) == pytest.approx(sorted(entry["schedules"]["wavek"]["measured_rss_growth_mb"] + entry["schedules"]["wavek"]["est_peak_growth_mb"]), rel=1e-3)


def test_simulation_at_p4_gives_finite_ratios():
    cfg = BenchConfig(
        hidden=8, layers=2, atoms=8, real=False, simulate=True, sim_models=["schnet"], sim_stages=[4],
        sim_factors=[1, 2], sim_ilp_time_s=2.0,
    )
    so_far = []
    sim = run_simulation(cfg, progress=False, on_rows=so_far.append)
    assert [(r["stages"], r["microbatches"]) for r in sim["rows"]] == [(4, 4), (4, 8)]
    # handed over after every M (a bench with --out writes it, marked partial)
    assert [len(x["rows"]) for x in so_far] == [1, 2]
    assert so_far[-1]["rows"] == sim["rows"] and so_far[-1]["averages"] == sim["averages"]
    assert so_far[0]["rows"] == sim["rows"][:1] and so_far[0]["averages"] == sim_averages(sim["rows"][:1])
    for r in sim["rows"]:
        assert set(r["schedules"]) == set(SCHEDULES) | {EQUAL_MEMORY, COUNT_CAP}, r["errors"]
        # the default fills an 80 GB device: it may hold more than P in flight, never fewer,
        # and its search contains every count-cap candidate, so it is never slower
        assert r["schedules"][COUNT_CAP]["peak_in_flight"] <= 4
        assert r["schedules"]["wavek"]["makespan_s"] <= r["schedules"][COUNT_CAP]["makespan_s"] * (1 + 1e-9)
        assert r["schedules"]["wavek"]["wavek_memory_fits"] is True
        eq = r["schedules"][EQUAL_MEMORY]
        if eq["wavek_memory_fits"]:
            assert eq["peak_memory_bytes"] <= r["schedules"]["1f1b"]["peak_memory_bytes"] * (1 + 1e-9)
        for k in ("wavek/1f1b", "wavek/hanayo"):
            assert r["ratios"][k] is not None and math.isfinite(r["ratios"][k]) and r["ratios"][k] > 0
        assert 0 < r["wavek_efficiency"] <= 1
        # wavek's search includes the phase-agnostic wave order: never worse than hanayo in the simulator
        assert r["ratios"]["wavek/hanayo"] >= 1 - 1e-9
    avg = {a["stages"]: a for a in sim["averages"]}
    assert math.isfinite(avg[4]["wavek/1f1b"]) and math.isfinite(avg["all"]["wavek/hanayo"])
    table = markdown_sim(sim)
    assert "wavek/1f1b" in table and "| schnet |" in table and "P in flight: wavek/1f1b" in table
    assert math.isfinite(avg[4]["wavek@count-P/1f1b"]) and 0 < avg[4]["wavek_count_efficiency"] <= 1
    # a 2-block model has too few units for 4 × 2 chunks at 1.5 units each: rebuilt deeper, and said so
    assert all(r["layers"] >= 2 for r in sim["rows"])
    # the charts plot these rows: one point per (M, schedule) at P = 4, the throughput
    # relative to 1F1B and the bubble fraction the rows hold
    charts = simulated_charts(sim)
    points = _svg_points(charts["sim_throughput_vs_p.svg"], "circle")
    for r in sim["rows"]:
        assert any(abs(points_of - r["ratios"]["wavek/1f1b"]) < 1e-3 * r["ratios"]["wavek/1f1b"] for points_of in points["wavek"])
    assert len(points["wavek"]) == len(points["1f1b"]) == 2 and all(abs(v - 1) < 1e-9 for v in points["1f1b"])
    bubbles = _svg_points(charts["sim_bubble_vs_p.svg"], "circle")
    assert sorted(bubbles["hanayo"]) == pytest.approx(sorted(r["schedules"]["hanayo"]["bubble_fraction"] for r in sim["rows"]), rel=1e-3)
    # WaveK's efficiency never exceeds the bound any schedule is held to, and the chart plots both
    for r in sim["rows"]:
        for s, v in r["schedules"].items():
            assert 0 < v["efficiency"] <= v["efficiency_bound"] * (1 + 1e-9) <= 1 + 1e-9, (s, v)
        assert r["wavek_efficiency_bound"] == r["schedules"]["wavek"]["efficiency_bound"]
    eff = _svg_points(charts["sim_efficiency_vs_p.svg"], "circle")
    assert sorted(eff["bound"]) == pytest.approx(sorted(r["wavek_efficiency_bound"] for r in sim["rows"]), rel=1e-3)
    assert sorted(eff["wavek"]) == pytest.approx(sorted(r["wavek_efficiency"] for r in sim["rows"]), rel=1e-3)


def _svg_points(svg: str, tag: str) -> dict:
    """name -> values of the ``tag`` elements of a chart (their titles read "name: value")."""
    import xml.etree.ElementTree as ET

    out: dict = {}
    for el in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}" + tag):
        title = el.find("{http://www.w3.org/2000/svg}title")
        if title is not None and ":" in title.text:
            name, value = title.text.rsplit(":", 1)
            out.setdefault(name.split(" ")[0], []).append(float(value))
    return out


def test_growth_ratio_compares_each_rank_with_itself():
    """Rank 0 grew 20 MB on an estimate of 2 (10x); rank 1 grew 30 on 30: the largest
    growth over the largest estimate (30 / 30 = 1.0) would hide rank 0."""
    from janus_compile.bench import worst_growth_ratio

    assert worst_growth_ratio([20.0, 30.0], [2.0, 30.0]) == 10.0
    assert worst_growth_ratio(None, [1.0]) is None and worst_growth_ratio([1.0], [0.0]) is None


def test_bench_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown schedule"):
        BenchConfig(schedules=["pipedream"])
    with pytest.raises(ValueError, match="stages >= 2"):
        BenchConfig(stages=1)
    with pytest.raises(ValueError, match="sim_memory_gb must be positive"):
        BenchConfig(sim_memory_gb=0)
    with pytest.raises(ValueError, match="ilp_time_s must be positive"):
        BenchConfig(ilp_time_s=0)
    with pytest.raises(ValueError, match="sim_ilp_time_s must be positive"):
        BenchConfig(sim_ilp_time_s=-1)
    with pytest.raises(ValueError, match="sim_baseline_splits must be one of"):
        BenchConfig(sim_baseline_splits="all")
    with pytest.raises(ValueError, match="timing_contenders must be >= 0"):
        BenchConfig(timing_contenders=-1)
    with pytest.raises(ValueError, match="nothing to run: --no-real"):
        BenchConfig(real=False, simulate=False)
    sim_only = dict(real=False, simulate=True)
    with pytest.raises(ValueError, match=r"sim_stages must be integers >= 2, got \[0\] \(--sim-stages\)"):
        BenchConfig(sim_stages=[0], **sim_only)
    with pytest.raises(ValueError, match=r"sim_factors must be integers >= 1, got \[4, 0\]"):
        BenchConfig(sim_factors=[4, 0], **sim_only)
    with pytest.raises(ValueError, match=r"sim_chunks must be integers >= 1, got \[\]"):
        BenchConfig(sim_chunks=[], **sim_only)
    with pytest.raises(ValueError, match="sim_models must name models from"):
        BenchConfig(sim_models=["mace"], **sim_only)
    with pytest.raises(ValueError, match="sim_bandwidth_gbs must be positive"):
        BenchConfig(sim_bandwidth_gbs=0, **sim_only)
    with pytest.raises(ValueError, match="sim_latency_us must be >= 0"):
        BenchConfig(sim_latency_us=-1, **sim_only)
    # the simulation splits as the trainer does unless told otherwise
    assert BenchConfig().sim_ilp_time_s == JanusOptions().ilp_time_limit_s


def test_simulated_hanayo_gets_the_wave_ks_wavek_gets():
    """A larger K shortens fill and drain for any wave schedule, so Hanayo is given every
    K >= 2 that WaveK is (its best kept) and K = 4 is not WaveK's advantage alone."""
    from janus_compile.bench import hanayo_chunks

    assert hanayo_chunks([1, 2]) == [2] and hanayo_chunks([1]) == [2] and hanayo_chunks([1, 2, 4]) == [2, 4]
    cfg = BenchConfig(
        hidden=8, layers=2, atoms=8, real=False, simulate=True, sim_models=["schnet"], sim_stages=[4],
        sim_factors=[1], sim_chunks=[1, 2, 4], sim_ilp_time_s=2.0, equal_memory=False, count_cap=False,
    )
    sim = run_simulation(cfg, progress=False)
    (row,) = sim["rows"]
    assert row["schedules"]["hanayo"]["chunks"] in (2, 4), row["errors"]
    assert row["schedules"]["wavek"]["chunks"] in (1, 2, 4)
    # WaveK's K as the trainer's chunks="auto" keeps it: a larger K only if shorter by more than the margin
    kept = None
    for name, t in row["schedules"]["wavek"]["tried_makespan_s"].items():
        if kept is None or t < kept[1] * (1 - AUTO_CHUNKS_MARGIN):
            kept = (name, t)
    assert f"K={row['schedules']['wavek']['chunks']}" == kept[0] and row["schedules"]["wavek"]["makespan_s"] == kept[1]
    # Hanayo keeps its fastest
    assert row["schedules"]["hanayo"]["makespan_s"] == min(row["schedules"]["hanayo"]["tried_makespan_s"].values())
    # WaveK searches the phase-agnostic wave order at every K Hanayo gets: never slower
    assert row["ratios"]["wavek/hanayo"] >= 1 - 1e-9
    head, _, line = markdown_sim(sim).splitlines()[:3]
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in line.split("|")]))
    once = ", once" if row["schedules"]["hanayo"]["transfer_charge"] == "once" else ""
    assert cells["hanayo K"] == f"{row['schedules']['hanayo']['chunks']}{once}"
    assert cells["wavek K"] == str(row["schedules"]["wavek"]["chunks"])  # the trainer's split: charged per chunk here


@pytest.fixture(scope="module")
def flop_priced_schnet():
    """A 4-block SchNet joint graph and its sizes, split with FLOP and byte costs (not
    timed): the same splits and simulated steps on every machine."""
    import janus_compile
    from janus_compile.bench import build_bench_model, sim_microbatches
    from janus_compile.compiled import size_values_from_batch

    mb = sim_microbatches(BenchConfig(hidden=8, atoms=8))[0]
    joint = janus_compile.compile(build_bench_model("schnet", 8, 4, 4.5, "float32", 0), mb).joint_graph(mb)
    return joint, size_values_from_batch(mb)


def _flop_split(flop_priced_schnet, P, K, bandwidth=25e9, **charge):
    from janus_compile.passes.symfold import partition_graph

    joint, sizes = flop_priced_schnet
    return partition_graph(joint.gm, P, K, "symfold", sizes=sizes, time_limit_s=10.0, bandwidth_bytes_per_s=bandwidth, **charge)


def _flop_simulate(flop_priced_schnet, parts, M, schedules, sim_chunks, alternatives=None, bandwidth=25e9):
    from janus_compile.bench import _sim_schedules
    from janus_compile.passes.wavek import PipelineDAG

    def dag(part):
        return PipelineDAG.from_partition(part, M, bandwidth_bytes_per_s=bandwidth, latency_s=20e-6)

    alts = {k: (p, dag(p)) for k, p in (alternatives or {}).items()}
    dags = {k: dag(p) for k, p in parts.items()}
    return _sim_schedules(parts, dags, schedules, sim_chunks, flop_priced_schnet[1], False, False, None, baseline_alternatives=alts)


def test_simulated_baselines_keep_the_faster_split_and_wavek_the_trainers(flop_priced_schnet):
    """Which transfer charge splits best varies by model and P, and a baseline must not
    lose on the split: Hanayo (and GPipe) run on the trainer's split and on one charged
    once per cut edge, the faster kept; WaveK stays on the trainer's split, so its
    ratios are what the trainer gets."""
    P, K, M, key, link = 3, 2, 6, ("symfold", 2), 5e9  # a slow link: how transfers are charged matters
    trainers = _flop_split(flop_priced_schnet, P, K, link)
    once = _flop_split(flop_priced_schnet, P, K, link, transfer_charge="once")
    assert trainers.problem.transfer_charge == "per_chunk" and once.problem.transfer_charge == "once"

    def simulate(part, alternative=None):
        return _flop_simulate(
            flop_priced_schnet, {key: part}, M, ["hanayo", "wavek", "gpipe"], [K], {key: alternative} if alternative else None, link
        )

    on_trainers, on_once, both = simulate(trainers), simulate(once), simulate(trainers, once)
    # here Hanayo is faster on the split charged once and GPipe on the trainer's: both choices show
    assert on_once["hanayo"]["makespan_s"] < on_trainers["hanayo"]["makespan_s"]
    assert on_trainers["gpipe"]["makespan_s"] < on_once["gpipe"]["makespan_s"]
    for s, faster, charge in (("hanayo", on_once, "once"), ("gpipe", on_trainers, "per_chunk")):
        assert both[s]["transfer_charge"] == charge and both[s]["tried_makespan_s"] == {"K=2": on_trainers[s]["makespan_s"], "K=2 once": on_once[s]["makespan_s"]}
        assert {k: v for k, v in both[s].items() if k != "tried_makespan_s"} == {k: v for k, v in faster[s].items() if k != "tried_makespan_s"}
    assert both["wavek"] == on_trainers["wavek"] and both["wavek"]["transfer_charge"] == "per_chunk"


def test_simulated_wavek_keeps_k_by_the_trainers_margin(flop_priced_schnet):
    """WaveK's K as chunks="auto" keeps it: a larger K only when its step is shorter by
    more than AUTO_CHUNKS_MARGIN. At P = 3 on a 10 GB/s link, K = 2 is shorter than K = 1
    at both M, by more than the margin at M = P (7 %) and by less at M = 3P (1.5 %)."""
    link = 10e9
    parts = {("symfold", k): _flop_split(flop_priced_schnet, 3, k, link) for k in (1, 2)}
    for M, kept in ((3, 2), (9, 1)):
        wavek = _flop_simulate(flop_priced_schnet, parts, M, ["wavek"], [2, 1], bandwidth=link)["wavek"]  # tried in the trainer's order whatever given
        t1, t2 = wavek["tried_makespan_s"]["K=1"], wavek["tried_makespan_s"]["K=2"]
        assert t2 < t1 and (t2 < t1 * (1 - AUTO_CHUNKS_MARGIN)) == (kept == 2), (M, t1, t2)
        assert wavek["chunks"] == kept and wavek["makespan_s"] == {1: t1, 2: t2}[kept]


def test_bench_simulation_writes_json_after_each_row(tmp_path, monkeypatch):
    """A study of hours keeps what it simulated: with --out the JSON is written after
    every simulated row (model, P, M; marked partial), then whole."""
    out = tmp_path / "sim.json"
    written = []
    real_write = bench.write_json
    monkeypatch.setattr(bench, "write_json", lambda path, r: (written.append(json.loads(json.dumps(r, default=str))), real_write(path, r)))
    args = [
        "bench", *TINY, "--no-real", "--simulate", "--sim-models", "schnet", "--sim-stages", "2", "4",
        "--sim-factors", "1", "2", "--sim-chunks", "1", "--sim-ilp-time", "1", "--no-equal-memory", "--no-count-cap",
        "--sim-baseline-splits", "trainer", "--out", str(out),
    ]
    assert main(args) == 0
    assert [w.get("partial", False) for w in written] == [True, True, True, True, False]
    assert written[-1]["config"]["sim_baseline_splits"] == "trainer"
    for row in written[-1]["simulated"]["rows"]:  # every schedule on the trainer's splits: none charged once made
        assert not [k for k in row["imbalance"] if k.endswith("charged once")]
        assert row["schedules"]["hanayo"]["transfer_charge"] == row["transfer_charge"][f"symfold K={row['schedules']['hanayo']['chunks']}"]
    rows_written = [[(r["stages"], r["microbatches"]) for r in w["simulated"]["rows"]] for w in written]
    assert rows_written == [[(2, 2)], [(2, 2), (2, 4)], [(2, 2), (2, 4), (4, 4)], [(2, 2), (2, 4), (4, 4), (4, 8)], [(2, 2), (2, 4), (4, 4), (4, 8)]]
    assert json.loads(out.read_text())["simulated"]["rows"] == written[-1]["simulated"]["rows"]
