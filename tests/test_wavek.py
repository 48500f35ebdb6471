"""WaveK and the baseline schedules: programs validate, broken ones are caught, timing is right.

Synthetic DAGs (no graph capture) keep these fast; one test builds the DAG of a real
SymFold / unfolded partition to check `PipelineDAG.from_partition` end to end.
"""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from janus_compile.passes.wavek import (
    MLIP_COSTS,
    PipelineDAG,
    ScheduleError,
    Task,
    build_programs,
    gantt_svg,
    gpipe,
    hanayo,
    in_flight,
    list_schedule,
    make_programs,
    one_f_one_b,
    simulate,
    simulated_stash,
    validate,
    wavek,
    wavek_search,
)
from janus_compile.runtime.program import Compute, GradSync, OptimizerStep, ProgramSet, RankProgram, Recv, Send, render_python


def _sizes(stages):
    return sorted({min(m, 64) for m in (1, stages, 2 * stages, 4 * stages)})


def _configs(stage_list):
    return [(p, k, m) for p in stage_list for k in (1, 2, 4) for m in _sizes(p)]


FAST = _configs([1, 2, 4, 8])
SLOW = _configs([16, 32])


def _check_every_task_once(programs: ProgramSet, dag: PipelineDAG) -> None:
    ran = Counter(Task(a.chunk, a.phase, a.mb) for p in programs.programs for a in p.actions if isinstance(a, Compute))
    assert set(ran) == set(dag.tasks()) and set(ran.values()) == {1}


def _check_all_schedules(stages, chunks, microbatches, wavek_rules=None):
    dag = PipelineDAG.synthetic(stages, chunks, microbatches, latency_s=0.05, boundary_bytes=1e6, bandwidth_bytes_per_s=1e8)
    kw = {"rules": wavek_rules} if wavek_rules else {}
    for name, orders in (("gpipe", gpipe(dag)), ("hanayo", hanayo(dag)), ("wavek", wavek(dag, **kw))):
        programs = build_programs(dag, orders, name)
        validate(programs, dag)
        _check_every_task_once(programs, dag)
        if name != "gpipe":
            assert max(in_flight(orders).values()) <= stages, name
    if chunks == 1:
        udag = PipelineDAG.synthetic(stages, 1, microbatches, layout="unfolded")
        for name, orders in (("gpipe", gpipe(udag)), ("1f1b", one_f_one_b(udag))):
            programs = build_programs(udag, orders, name)
            validate(programs, udag)
            _check_every_task_once(programs, udag)


@pytest.mark.parametrize("stages,chunks,microbatches", FAST)
def test_validator_accepts_generated_programs(stages, chunks, microbatches):
    _check_all_schedules(stages, chunks, microbatches)


@pytest.mark.parametrize(
    "stages,chunks,microbatches",
    [pytest.param(*c, marks=pytest.mark.slow) if c[0] * c[1] * c[2] > 32 * 2 * 32 else c for c in SLOW],
)
def test_validator_accepts_generated_programs_large(stages, chunks, microbatches):
    """P = 16, 32: WaveK with one rule (its other rules run the same list scheduler)."""
    _check_all_schedules(stages, chunks, microbatches, wavek_rules=("deadline:0.35",))


# -- broken programs --------------------------------------------------------------------


def _wavek_programs(stages=4, chunks=2, microbatches=8):
    dag = PipelineDAG.synthetic(stages, chunks, microbatches)
    return dag, build_programs(dag, wavek(dag), "wavek")


def _replace(programs: ProgramSet, rank: int, actions) -> ProgramSet:
    progs = [dataclasses.replace(p) for p in programs.programs]
    progs[rank] = RankProgram(rank, list(actions))
    return ProgramSet(programs.stages, progs, programs.meta)


def test_swapped_receives_deadlock():
    dag, programs = _wavek_programs()
    for prog in programs.programs:
        recvs = [i for i, a in enumerate(prog.actions) if isinstance(a, Recv)]
        pair = next(((i, j) for i in recvs for j in recvs if i < j and prog.actions[i].src == prog.actions[j].src), None)
        if pair:
            break
    i, j = pair
    actions = list(prog.actions)
    actions[i], actions[j] = actions[j], actions[i]
    with pytest.raises(ScheduleError) as err:
        validate(_replace(programs, prog.rank, actions), dag)
    msg = str(err.value)
    assert "deadlock" in msg
    assert f"rank {prog.rank} action #{i}" in msg and f"channel {actions[i].src}->{prog.rank}" in msg
    assert actions[i].render() in msg  # the receive it is stuck on


def test_dropped_send_deadlocks():
    dag, programs = _wavek_programs()
    prog = programs.programs[0]
    k = next(i for i, a in enumerate(prog.actions) if isinstance(a, Send))
    dropped = prog.actions[k]
    with pytest.raises(ScheduleError) as err:
        validate(_replace(programs, 0, prog.actions[:k] + prog.actions[k + 1 :]), dag)
    msg = str(err.value)
    assert "deadlock" in msg and f"channel 0->{dropped.dst}" in msg and f"rank {dropped.dst}" in msg


def test_cyclic_wait_is_a_deadlock():
    """Rank 0 waits for rank 1's G before its F; rank 1's G needs that F: a cycle."""
    dag = PipelineDAG(
        stages=2,
        microbatches=1,
        rank_of_chunk={0: 0, 1: 1},
        cost={(0, "F"): 1, (1, "F"): 1, (1, "G"): 1, (0, "G"): 1},
        deps={(1, "F"): [(0, "F")], (1, "G"): [(1, "F")], (0, "G"): [(1, "G"), (0, "F")]},
    )
    r0 = [Recv(("g1_out",), 1, 1, "G", 0), Compute(0, "F", 0), Send(("f0_out",), 1, 0, "F", 0), Compute(0, "G", 0)]
    r1 = [Recv(("f0_out",), 0, 0, "F", 0), Compute(1, "F", 0), Compute(1, "G", 0), Send(("g1_out",), 0, 1, "G", 0)]
    programs = ProgramSet(2, [RankProgram(0, r0), RankProgram(1, r1)])
    with pytest.raises(ScheduleError, match="deadlock") as err:
        validate(programs, dag)
    assert "rank 0 action #0" in str(err.value) and "rank 1 action #0" in str(err.value)
    good = ProgramSet(2, [RankProgram(0, r0[1:3] + r0[:1] + r0[3:]), RankProgram(1, r1)])
    validate(good, dag)


def test_missing_duplicate_and_unreceived_tasks_are_rejected():
    dag, programs = _wavek_programs(2, 1, 2)
    prog = programs.programs[1]
    k = next(i for i, a in enumerate(prog.actions) if isinstance(a, Compute))
    with pytest.raises(ScheduleError, match="runs twice"):
        validate(_replace(programs, 1, prog.actions[: k + 1] + prog.actions[k:]), dag)
    with pytest.raises(ScheduleError, match="never run"):
        validate(_replace(programs, 1, [a for a in prog.actions if a != prog.actions[k]]), dag)
    # a compute moved before the receive of its input
    r = next(i for i, a in enumerate(prog.actions) if isinstance(a, Recv))
    c = next(i for i, a in enumerate(prog.actions) if isinstance(a, Compute) and i > r)
    moved = list(prog.actions)
    moved.insert(r, moved.pop(c))
    with pytest.raises(ScheduleError, match="not received before"):
        validate(_replace(programs, 1, moved), dag)


# -- simulator --------------------------------------------------------------------------


@pytest.mark.parametrize("stages,microbatches", [(1, 3), (4, 8), (8, 4), (6, 13)])
@pytest.mark.parametrize("costs", [{"F": 1, "G": 1, "GG": 1, "FB": 1}, MLIP_COSTS])
def test_gpipe_matches_closed_form(stages, microbatches, costs):
    """GPipe on a chain: each half takes (M + P - 1) × its per-stage time."""
    dag = PipelineDAG.synthetic(stages, 1, microbatches, phase_cost=costs)
    res = simulate(build_programs(dag, gpipe(dag)), dag)
    fwd, bwd = costs["F"] + costs["G"], costs["GG"] + costs["FB"]
    assert res.makespan == pytest.approx((microbatches + stages - 1) * (fwd + bwd), rel=1e-9)
    assert res.peak_in_flight[0] == microbatches
    udag = PipelineDAG.synthetic(stages, 1, microbatches, phase_cost=costs, layout="unfolded")
    for orders in (gpipe(udag), one_f_one_b(udag)):
        ures = simulate(build_programs(udag, orders), udag)
        assert ures.makespan == pytest.approx((microbatches + stages - 1) * (fwd + bwd), rel=1e-9)
    assert simulate(build_programs(udag, one_f_one_b(udag)), udag).peak_in_flight == [min(stages - r, microbatches) for r in range(stages)]


def test_transfer_time_and_bubble():
    dag = PipelineDAG(
        stages=2, microbatches=1, rank_of_chunk={0: 0, 1: 1}, cost={(0, "F"): 2.0, (1, "F"): 3.0},
        deps={(1, "F"): [(0, "F")]}, tensors={((0, "F"), (1, "F")): ("h",)}, nbytes={"h": 4e6},
        bandwidth_bytes_per_s=1e6, latency_s=0.5,
    )
    res = simulate(build_programs(dag, gpipe(dag)), dag)
    assert res.makespan == pytest.approx(2.0 + 0.5 + 4.0 + 3.0)
    assert res.busy == [2.0, 3.0]
    assert res.bubble_fraction == pytest.approx(1 - 5.0 / (2 * 9.5))
    assert res.efficiency == pytest.approx(5.0 / 2 / 9.5)
    assert res.peak_stash_bytes == [4e6, 4e6]  # held by the sender until it arrives, then by the reader


@pytest.mark.parametrize("latency", [0.0, 0.1])
def test_wavek_beats_baselines_at_p4_m8(latency):
    P, M = 4, 8
    kw = dict(latency_s=latency, boundary_bytes=1e6, bandwidth_bytes_per_s=1e8)
    folded = PipelineDAG.synthetic(P, 2, M, phase_cost=MLIP_COSTS, **kw)
    unfolded = PipelineDAG.synthetic(P, 1, M, phase_cost=MLIP_COSTS, layout="unfolded", **kw)
    span = {}
    for name, dag in (("wavek", folded), ("gpipe", folded), ("hanayo", folded), ("1f1b", unfolded)):
        span[name] = make_programs(dag, name).meta["simulated"]["makespan_s"]
    assert span["wavek"] <= span["gpipe"] and span["wavek"] <= span["hanayo"] and span["wavek"] <= span["1f1b"], span
    assert span["wavek"] < span["1f1b"]  # the fold's shorter fill and drain


def test_wavek_is_deterministic_and_respects_its_cap():
    dag = PipelineDAG.synthetic(4, 2, 12)
    a, b = make_programs(dag, "wavek"), make_programs(dag, "wavek")
    assert a.to_json() == b.to_json()
    orders = wavek(dag, max_in_flight=3)
    assert max(in_flight(orders).values()) <= 3
    assert max(simulate(build_programs(dag, orders), dag).peak_in_flight) <= 3


def test_skip_connections_from_plain_dicts():
    """A DAG with a skip edge (chunk 0 → chunk 2) and a cross-chunk stash read."""
    cost = {(c, p): 1.0 for c in range(3) for p in ("F", "G", "GG", "FB")}
    deps = {
        (1, "F"): [(0, "F")], (2, "F"): [(1, "F"), (0, "F")],
        (2, "G"): [(2, "F")], (1, "G"): [(2, "G"), (1, "F")], (0, "G"): [(1, "G"), (0, "F"), (2, "F")],
        (0, "GG"): [(0, "G")], (1, "GG"): [(0, "GG"), (1, "G")], (2, "GG"): [(1, "GG"), (2, "G")],
        (2, "FB"): [(2, "GG"), (0, "F")], (1, "FB"): [(2, "FB"), (1, "GG")], (0, "FB"): [(1, "FB"), (0, "GG")],
    }
    dag = PipelineDAG(stages=3, microbatches=5, rank_of_chunk={0: 0, 1: 1, 2: 2}, cost=cost, deps=deps)
    for name in ("gpipe", "hanayo", "wavek"):
        programs = make_programs(dag, name)
        msgs = [a for p in programs.programs for a in p.actions if isinstance(a, Send) and (a.chunk, a.phase) == (0, "F")]
        assert sorted({m.dst for m in msgs}) == [1, 2]  # one message per destination, not per consumer
    with pytest.raises(ScheduleError, match="unfolded"):
        make_programs(dag, "1f1b")


# -- program IR -------------------------------------------------------------------------


def test_json_round_trip_and_validate_from_meta():
    dag = PipelineDAG.synthetic(4, 2, 8, boundary_bytes=1e6, latency_s=1e-3, bandwidth_bytes_per_s=1e9)
    programs = make_programs(dag, "wavek")
    again = ProgramSet.from_json(programs.to_json())
    assert again == programs
    assert any(isinstance(a, GradSync) for a in again.programs[0].actions)
    assert isinstance(again.programs[0].actions[-1], OptimizerStep)
    validate(again)  # the DAG description travels in meta
    assert simulate(again, dag).makespan == pytest.approx(programs.meta["simulated"]["makespan_s"])


def test_render_python_lists_every_action():
    _, programs = _wavek_programs(2, 2, 4)
    for prog in programs.programs:
        text = render_python(prog)
        compile(text, f"rank{prog.rank}.py", "exec")  # a Python-like listing that is Python
        body = [line for line in text.splitlines() if not line.startswith("#")]
        assert body == [a.render() for a in prog.actions]
    recv = next(a for p in programs.programs for a in p.actions if isinstance(a, Recv))
    assert recv.render().startswith(f'recv(["{recv.tensors[0]}"')
    assert f'group=({recv.chunk}, "{recv.phase}"), mb={recv.mb})' in recv.render()


def test_gantt_svg_is_well_formed(tmp_path):
    dag = PipelineDAG.synthetic(4, 2, 8)
    res = simulate(make_programs(dag, "wavek"), dag)
    path = tmp_path / "gantt.svg"
    gantt_svg(res, str(path), title="WaveK <P=4> & M=8")
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    boxes = [e for e in root.iter() if e.tag.endswith("rect") and any(c.tag.endswith("title") for c in e)]
    assert len(boxes) == len(dag.tasks())
    fills = {e.get("fill") for e in boxes}
    assert fills == {"#8ecae6", "#ffb703", "#fb8500", "#219ebc"}


# -- real partition ---------------------------------------------------------------------


def test_dag_from_real_partition():
    import torch
    from conftest import random_batch

    import janus_compile
    from janus_compile import EnergyForceLoss
    from janus_compile.models import build_model
    from janus_compile.passes.symfold import partition_graph

    torch.manual_seed(0)
    model = build_model("schnet", hidden=8, num_interactions=4, num_rbf=6, cutoff=3.5).double().train()
    joint = janus_compile.compile(model, loss=EnergyForceLoss()).joint_graph(random_batch(5, 3))
    for method, P, K, schedules in (("even", 2, 2, ("gpipe", "hanayo", "wavek")), ("unfolded", 2, 1, ("gpipe", "1f1b"))):
        part = partition_graph(joint.gm, P, K, method)
        dag = PipelineDAG.from_partition(part, microbatches=4)
        assert set(dag.groups) == set(part.plan.groups)
        assert sum(dag.cost.values()) == pytest.approx(sum(part.chunk_phase_time().values()))
        for (prod, cons), names in dag.tensors.items():
            assert set(names) <= set(part.plan.groups[prod].outputs) & set(part.plan.groups[cons].inputs)
        for name in schedules:
            programs = make_programs(dag, name)
            _check_every_task_once(programs, dag)
            sent = {t for p in programs.programs for a in p.actions if isinstance(a, Send) for t in a.tensors}
            assert sent and sum(dag.nbytes[t] for t in sent) > 0  # sized from out_bytes


def test_stash_budget_bounds_memory_not_the_micro_batch_count():
    """With a stash budget WaveK may keep more than P micro-batches in flight, never
    exceeds the budget, and is at least as fast as with the count cap P; a budget nothing
    fits falls back to the count cap."""
    P, M = 4, 16
    dag = PipelineDAG.synthetic(P, 1, M, phase_cost=MLIP_COSTS, stash_bytes=1e6, boundary_bytes=1e5, bandwidth_bytes_per_s=1e9)
    capped = make_programs(dag, "wavek").meta["simulated"]
    budget = 1.6 * max(capped["peak_stash_bytes"])
    found = make_programs(dag, "wavek", memory_budget_bytes=budget).meta
    assert max(found["simulated"]["peak_stash_bytes"]) <= budget * (1 + 1e-9)
    assert found["simulated"]["makespan_s"] <= capped["makespan_s"] * (1 + 1e-9)
    assert found["wavek_cap"] > P  # the budget was used for more micro-batches in flight
    tiny = make_programs(dag, "wavek", memory_budget_bytes=1.0).meta
    assert max(tiny["simulated"]["peak_in_flight"]) <= P
    # memory to spare (the default budget on a large device): the fastest candidate of all
    # is measured, then the near tie holding fewest in flight (caps 2.5P and 3P tie with
    # 2P here), then its forward-backward improvement if that was faster; no per-rank
    # caps are fitted
    measured = []
    ample = wavek_search(dag, memory_budget_bytes=1e15, memory_of=lambda programs: measured.append(1) or simulated_stash(dag)(programs))
    assert len(measured) == 2 + ample.rule.endswith("+fb") and ample.memory_fits
    assert ample.makespan == min(ms for _, _, ms in ample.candidates)
    assert {cap for _, cap, _ in ample.candidates} == {P // 2, 3 * P // 4, P, 5 * P // 4, 3 * P // 2, 2 * P, 5 * P // 2, 3 * P}  # GPipe holds M = 4P: over 3P
    assert ample.cap == 2 * P


def test_per_rank_caps_are_respected_and_fitted_to_the_budget():
    """A cap per rank bounds each rank's in-flight count; under a memory budget the search
    may give ranks different caps, and a strict search that nothing fits names the
    budget and the smallest peak it found."""
    P, M = 4, 16
    dag = PipelineDAG.synthetic(P, 1, M, phase_cost=MLIP_COSTS, stash_bytes=1e6)
    caps = [6, 3, 5, 2]
    got = in_flight(list_schedule(dag, dag.cost, "deadline:0.5", caps))
    assert all(got[r] <= caps[r] for r in range(P)) and got[0] > got[3]
    with pytest.raises(ValueError, match="each of the 4 ranks"):
        list_schedule(dag, dag.cost, "critical_path", [1, 2])
    # a rank whose micro-batches weigh half gets a larger cap fitted to the same budget
    memory = lambda programs: [b * (0.5 if r == P - 1 else 1.0) for r, b in enumerate(simulated_stash(dag)(programs))]
    base = max(memory(make_programs(dag, "wavek")))
    found = wavek_search(dag, memory_budget_bytes=1.3 * base, memory_of=memory)
    fitted = [cap for _, cap, _ in found.candidates if isinstance(cap, list)]
    assert fitted and all(cap[P - 1] > max(cap[: P - 1]) for cap in fitted)
    assert max(found.memory_bytes) <= 1.3 * base * (1 + 1e-9)
    assert found.memory_bytes == pytest.approx(memory(build_programs(dag, found.orders)))
    with pytest.raises(ScheduleError, match=r"no schedule fits the memory budget of 0\.0 MiB per rank; the smallest candidate needs"):
        wavek_search(dag, memory_budget_bytes=1.0, memory_of=memory, strict=True)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "wavek"])
def test_send_releases_wait_only_for_sends_the_peer_has_received(schedule):
    """A send is waited for only after a receive whose sender had already received it."""
    from janus_compile.runtime.program import send_releases

    layout = "unfolded" if schedule == "1f1b" else "folded"
    dag = PipelineDAG.synthetic(3, 1, 6, layout=layout)
    programs = make_programs(dag, schedule)
    # n-th message on each channel: index of the send at the source, of the receive at the destination
    sends, recvs = {}, {}
    for prog in programs.programs:
        count = Counter()
        for k, a in enumerate(prog.actions):
            if isinstance(a, Send):
                sends[(prog.rank, a.dst, count[(prog.rank, a.dst)])] = k
                count[(prog.rank, a.dst)] += 1
            elif isinstance(a, Recv):
                recvs[(a.src, prog.rank, count[(a.src, prog.rank)])] = k
                count[(a.src, prog.rank)] += 1
    released = 0
    for prog in programs.programs:
        rank = prog.rank
        for recv_index, send_indices in send_releases(programs, rank).items():
            answer = prog.actions[recv_index]
            assert isinstance(answer, Recv)
            # which message is this receive, and where did its sender send it
            n = sum(1 for a in prog.actions[:recv_index] if isinstance(a, Recv) and a.src == answer.src)
            answered_at = sends[(answer.src, rank, n)]
            for s in send_indices:
                sent = prog.actions[s]
                assert isinstance(sent, Send) and sent.dst == answer.src and s < recv_index
                m = sum(1 for a in prog.actions[:s] if isinstance(a, Send) and a.dst == sent.dst)
                assert recvs[(rank, sent.dst, m)] < answered_at, "the peer answered before it had received"
                released += 1
    assert released > 0


def _orders_holding(in_flight_count: int):
    """One rank, two micro-batches, F then FB each: both in flight at once, or one."""
    if in_flight_count == 2:
        seq = [Task(0, "F", 0), Task(0, "F", 1), Task(0, "FB", 0), Task(0, "FB", 1)]
    else:
        seq = [Task(0, "F", 0), Task(0, "FB", 0), Task(0, "F", 1), Task(0, "FB", 1)]
    return {0: seq}


def test_near_ties_go_to_the_fewest_in_flight():
    from janus_compile.passes.wavek import NEAR_TIE, _fewest_in_flight

    best = (1.0, 0, "critical_path", 2, _orders_holding(2))
    close = (1.0 + NEAR_TIE / 2, 1, "critical_path", 1, _orders_holding(1))
    far = (1.0 + 2 * NEAR_TIE, 1, "critical_path", 1, _orders_holding(1))
    assert in_flight(best[4]) == {0: 2} and in_flight(close[4]) == {0: 1}
    assert _fewest_in_flight([best, close], best, lambda e: True) is close
    assert _fewest_in_flight([best, far], best, lambda e: True) is best  # a real difference
    assert _fewest_in_flight([best, close], best, lambda e: e is not close) is best  # over the budget
    # a baseline's own order inside the window closes it: never slower than the baselines
    baseline = (1.0 + NEAR_TIE / 4, 2, "phase_agnostic", 2, _orders_holding(2))
    assert _fewest_in_flight([best, baseline, close], best, lambda e: True) is best


def test_search_keeps_within_the_tie_of_the_fastest_and_never_behind_the_baselines():
    for stages, chunks, m in ((4, 1, 16), (4, 2, 8), (8, 1, 32)):
        dag = PipelineDAG.synthetic(stages, chunks, m, latency_s=0.05, boundary_bytes=1e6, bandwidth_bytes_per_s=1e8)
        res = wavek_search(dag, memory_budget_bytes=float("inf"))
        fastest = min(ms for _, _, ms in res.candidates)
        assert res.makespan <= fastest * (1 + 0.01) + 1e-12
        for rule, _, ms in res.candidates:
            if rule in ("phase_agnostic", "gpipe"):
                assert res.makespan <= ms + 1e-12


from hypothesis import given, settings
from hypothesis import strategies as st

from janus_compile.passes.wavek import makespan_lower_bound


def _bound_over_every_subset(dag):
    """The bound by brute force: every non-empty set of a rank's groups."""
    import itertools

    from janus_compile.passes.wavek import _heads, _tails

    head, tail = _heads(dag), _tails(dag, dag.cost)
    best = max(tail.values())
    for r in range(dag.stages):
        on = dag.groups_on(r)
        for k in range(1, len(on) + 1):
            for S in itertools.combinations(on, k):
                work = dag.microbatches * sum(dag.cost[g] for g in S)
                best = max(best, min(head[g] for g in S) + work + min(tail[g] - dag.cost[g] for g in S))
    return best


@settings(max_examples=25, deadline=None)
@given(
    stages=st.integers(1, 5),
    chunks=st.integers(1, 2),
    factor=st.integers(1, 3),
    costs=st.tuples(*[st.floats(0.1, 3.0) for _ in range(4)]),
    latency=st.sampled_from([0.0, 0.05]),
)
def test_no_schedule_beats_the_makespan_lower_bound(stages, chunks, factor, costs, latency):
    """Every schedule's simulated makespan is at least the bound, so the reported
    efficiency bound is never below a reached efficiency; the pairs the bound tries give
    what every subset of a rank's groups would."""
    pc = dict(zip(("F", "G", "GG", "FB"), costs))
    M = factor * stages
    folded = PipelineDAG.synthetic(stages, chunks, M, pc, boundary_bytes=1e6, bandwidth_bytes_per_s=1e7, latency_s=latency)
    unfolded = PipelineDAG.synthetic(stages, 1, M, pc, layout="unfolded", boundary_bytes=1e6, bandwidth_bytes_per_s=1e7, latency_s=latency)
    for dag, schedules in ((folded, ["gpipe", "wavek"] + (["hanayo"] if stages > 1 else [])), (unfolded, ["gpipe", "1f1b"])):
        bound = makespan_lower_bound(dag)
        assert bound == pytest.approx(_bound_over_every_subset(dag), rel=1e-12)
        for schedule in schedules:
            sim = make_programs(dag, schedule).meta["simulated"]
            assert sim["makespan_s"] >= bound * (1 - 1e-12), (schedule, sim["makespan_s"], bound)
            assert sim["efficiency"] <= sim["efficiency_bound"] * (1 + 1e-12)


def test_makespan_lower_bound_is_tight_where_it_should_be():
    """One rank: no fill, no drain, the bound is the work. One micro-batch: the bound is
    its critical path, which every schedule reaches."""
    pc = {"F": 1.0, "G": 1.5, "GG": 2.0, "FB": 2.5}
    one_rank = PipelineDAG.synthetic(1, 1, 6, pc)
    assert makespan_lower_bound(one_rank) == pytest.approx(6 * 7.0)
    chain = PipelineDAG.synthetic(4, 1, 1, pc, boundary_bytes=1e6, bandwidth_bytes_per_s=1e7)
    assert makespan_lower_bound(chain) == pytest.approx(simulate(make_programs(chain, "gpipe"), chain).makespan)
    # P = 4, M = 4P (phase costs are per rank): the top rank waits for P - 1 F tasks,
    # runs its 16 micro-batches' work, and the last FB still runs down P - 1 ranks
    dag = PipelineDAG.synthetic(4, 1, 16, pc)
    assert makespan_lower_bound(dag) == pytest.approx(3 * pc["F"] + 16 * 7.0 + 3 * pc["FB"])


from janus_compile.passes.wavek import IMPROVEMENT_STARTS, _improve_pick, evaluate_orders, forward_backward


def _uneven(stages, chunks, microbatches, seed):
    """A synthetic DAG whose chunks cost 0.6-1.5x the even split: a real split's imbalance."""
    import random

    rnd = random.Random(seed)
    dag = PipelineDAG.synthetic(stages, chunks, microbatches, boundary_bytes=1e6, bandwidth_bytes_per_s=1e8, latency_s=0.01)
    mult = {c: rnd.uniform(0.6, 1.5) for c in dag.rank_of_chunk}
    return dataclasses.replace(dag, cost={g: t * mult[g[0]] for g, t in dag.cost.items()})


def test_reversed_dag_turns_every_edge_round():
    dag = _uneven(3, 2, 4, seed=0)
    back = dag.reversed()
    assert {(d, g) for g, ds in back.deps.items() for d in ds} == {(g, d) for g, ds in dag.deps.items() for d in ds}
    for g, ds in dag.deps.items():
        for d in ds:
            assert back.comm_time(g, d) == dag.comm_time(d, g) > 0 or dag.rank(d) == dag.rank(g)
    twice = back.reversed()
    assert {g: sorted(ds) for g, ds in twice.deps.items()} == {g: sorted(ds) for g, ds in dag.deps.items()}
    assert back.cost == dag.cost and back.rank_of_chunk == dag.rank_of_chunk


@pytest.mark.parametrize("stages,chunks,microbatches,seed", [(4, 2, 16, 1), (8, 1, 32, 0), (4, 1, 16, 3), (8, 2, 16, 5)])
def test_forward_backward_is_never_slower_and_its_orders_run(stages, chunks, microbatches, seed):
    """From a poor start (longest path first) it must gain; its orders validate, hold the
    cap, and the simulator times them as the search did."""
    dag = _uneven(stages, chunks, microbatches, seed)
    cap = stages
    start = list_schedule(dag, dag.cost, "critical_path", cap)
    ms0 = evaluate_orders(dag, start)
    ms, orders = forward_backward(dag, start, cap)
    assert ms < ms0
    assert max(in_flight(orders).values()) <= cap
    programs = build_programs(dag, orders, "wavek")
    validate(programs, dag)
    _check_every_task_once(programs, dag)
    assert simulate(programs, dag).makespan == pytest.approx(ms, rel=1e-9)


def test_search_improves_its_pick_by_forward_backward():
    """On uneven splits the search's pick gains 1-5 %; the improved rule is named, the
    improved orders are what the programs run, and without ``improve`` the pick is the
    list schedule's."""
    gained = 0
    for stages, chunks, m, seed in ((4, 2, 16, 1), (8, 1, 32, 1), (8, 2, 16, 5)):
        dag = _uneven(stages, chunks, m, seed)
        plain, improved = wavek_search(dag, improve=False), wavek_search(dag)
        assert improved.makespan <= plain.makespan
        assert "+fb" not in plain.rule and all("+fb" not in r for r, _, _ in plain.candidates)
        if improved.rule.endswith("+fb"):
            gained += 1
            assert improved.makespan < plain.makespan
            assert improved.rule.removesuffix("+fb") in {rule for rule, _, _ in plain.candidates}
            assert improved.makespan == min(ms for rule, _, ms in improved.candidates if rule.endswith("+fb"))
        programs = make_programs(dag, "wavek")
        assert programs.meta["simulated"]["makespan_s"] == pytest.approx(improved.makespan, rel=1e-9)
        assert max(in_flight(improved.orders).values()) <= stages
    assert gained == 3


def test_forward_backward_orders_over_the_memory_budget_are_not_taken():
    """Against a memory budget the improved orders are measured too: where they would not
    fit, the search keeps its pick."""
    dag = _uneven(4, 2, 16, 1)
    ample = wavek_search(dag, memory_budget_bytes=1e30, memory_of=lambda programs: [0.0])
    plain = wavek_search(dag, memory_budget_bytes=1e30, memory_of=lambda programs: [0.0], improve=False)
    assert ample.rule == plain.rule + "+fb" and ample.makespan < plain.makespan

    def heavier_when_faster(programs):  # every order faster than the pick is "over the budget"
        return [1e31 if simulate(programs, dag).makespan < plain.makespan * (1 - 1e-9) else 0.0]

    kept = wavek_search(dag, memory_budget_bytes=1e30, memory_of=heavier_when_faster)
    assert kept.rule == plain.rule and kept.makespan == plain.makespan and kept.memory_fits
    tried = [rule for rule, _, _ in kept.candidates[len(plain.candidates):]]
    assert plain.rule + "+fb" in tried and all(rule.endswith("+fb") for rule in tried)  # tried, reported, not taken


def test_forward_backward_from_several_starts_keeps_the_fastest():
    """Where forward-backward ends depends on where it starts: from the pick alone it
    ends slower here than from another rule's candidate at the same cap, which the search
    then takes, naming that rule."""
    dag = _uneven(4, 2, 16, 4)
    plain = wavek_search(dag, improve=False)
    from_pick = _improve_pick(dag, plain, simulated_stash(dag), None)
    full = wavek_search(dag)
    assert full.makespan < from_pick.makespan < plain.makespan
    attempts = [(rule, cap, ms) for rule, cap, ms in full.candidates if rule.endswith("+fb")]
    assert plain.rule + "+fb" in {rule for rule, _, _ in attempts} and full.rule != plain.rule + "+fb"
    assert len(attempts) <= IMPROVEMENT_STARTS and len({rule for rule, _, _ in attempts}) == len(attempts)
    assert {cap for _, cap, _ in attempts} == {plain.cap}  # the same cap: like memory
    assert full.makespan == min(ms for _, _, ms in attempts)
    programs = make_programs(dag, "wavek")
    validate(programs, dag)
    assert programs.meta["simulated"]["makespan_s"] == pytest.approx(full.makespan, rel=1e-9)
