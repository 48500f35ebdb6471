"""SymFold partition ILP: wave placement, balance, order, errors and determinism."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from janus_compile.passes.symfold_ilp import (
    PHASES,
    STATUS_EVEN,
    STATUS_OPTIMAL,
    STATUS_TIME_LIMIT,
    PartitionError,
    PartitionProblem,
    PartitionSolution,
    Unit,
    UnitEdge,
    _best_chain_split,
    _evaluate,
    _memory_lower_bound,
    even_partition,
    solve_partition,
    wave_rank,
)

SOLVED = {STATUS_OPTIMAL, STATUS_TIME_LIMIT}


def _unit(name: str, f: float, param: float = 1e6, stash: float = 1e7) -> Unit:
    """A unit whose four phases cost f, f, 2f, 2f (double backward and backward ~ 2x forward)."""
    return Unit(name, {"F": f, "G": f, "GG": 2 * f, "FB": 2 * f}, param_bytes=param, stash_bytes=stash)


def _chain(costs, edge_bytes: float = 1e6, **kw) -> PartitionProblem:
    units = [_unit(f"u{i}", c) for i, c in enumerate(costs)]
    edges = [UnitEdge(i, i + 1, edge_bytes) for i in range(len(units) - 1)]
    return PartitionProblem(units=units, edges=edges, **kw)


def _check_consistent(problem: PartitionProblem, sol: PartitionSolution) -> None:
    """Order, coverage and the reported figures agree with the assignment."""
    v = problem.stages * problem.chunks
    a = sol.chunk_of_unit
    assert len(a) == len(problem.units)
    assert all(0 <= c < v for c in a)
    if problem.order == "chain":
        assert all(a[i] <= a[i + 1] for i in range(len(a) - 1)), a
        assert a[0] == 0 and a[-1] == v - 1
    for e in problem.edges:
        assert a[e.src] <= a[e.dst], (e, a)
    assert set(a) == set(range(v)), "every chunk needs a unit"
    rank_time = [0.0] * problem.stages
    for u, c in zip(problem.units, a):
        rank_time[wave_rank(c, problem.stages)] += u.total_cost()
    assert sol.rank_time == pytest.approx(rank_time)
    total = sum(u.total_cost() for u in problem.units)
    assert sum(sum(ct[p] for p in PHASES) for ct in sol.chunk_time) == pytest.approx(total)
    if sol.bound is not None:
        assert sol.bound <= sol.objective * (1 + 1e-9)
        assert sol.gap is not None and 0.0 <= sol.gap <= 1.0


def test_wave_rank_p4_k2():
    assert [wave_rank(c, 4) for c in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [wave_rank(c, 4) for c in range(12)][8:] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        wave_rank(-1, 4)


def test_even_partition_counts():
    sol = even_partition(_chain([1.0] * 10, stages=2, chunks=2))
    counts = Counter(sol.chunk_of_unit)
    assert sorted(counts) == [0, 1, 2, 3]
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sol.status == STATUS_EVEN and sol.bound is None


def test_equal_chain_p4_k1(tmp_path):
    problem = _chain([1.0] * 12, stages=4, chunks=1)
    lp = tmp_path / "symfold.lp"
    sol = solve_partition(problem, lp_path=str(lp))
    assert sol.status == STATUS_OPTIMAL
    assert Counter(sol.chunk_of_unit) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert sol.imbalance == pytest.approx(1.0)
    assert max(sol.rank_time) / (sum(sol.rank_time) / 4) == pytest.approx(1.0)
    _check_consistent(problem, sol)
    assert lp.read_text() == sol.lp_text
    assert "Minimize" in sol.lp_text and "x_u0_c0" in sol.lp_text
    assert sol.num_variables > 0 and sol.num_constraints > 0


def test_heavy_unit_beats_even_split():
    costs = [1.0] * 12
    costs[4] = 5.0
    problem = _chain(costs, stages=4, chunks=1)
    sol = solve_partition(problem)
    even = even_partition(problem)
    _check_consistent(problem, sol)
    assert sol.status == STATUS_OPTIMAL
    assert sol.imbalance < even.imbalance - 0.1
    assert sol.objective < even.objective


@st.composite
def _random_problems(draw):
    stages = draw(st.integers(1, 3))
    chunks = draw(st.integers(1, 2))
    v = stages * chunks
    n = draw(st.integers(v, v + 6))
    costs = draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n))
    units = [
        Unit(f"u{i}", {"F": c, "G": c / 2, "GG": c, "FB": c}, param_bytes=1e3, stash_bytes=1e4)
        for i, c in enumerate(costs)
    ]
    edges = [UnitEdge(i, i + 1, draw(st.floats(0.0, 1e9))) for i in range(n - 1)]
    if n >= 3:
        for _ in range(draw(st.integers(0, 3))):
            src = draw(st.integers(0, n - 3))
            dst = draw(st.integers(src + 2, n - 1))
            edges.append(UnitEdge(src, dst, draw(st.floats(0.0, 1e9))))
    return PartitionProblem(units=units, edges=edges, stages=stages, chunks=chunks, time_limit_s=10.0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_problems())
def test_random_chains_respect_order(problem):
    sol = solve_partition(problem)
    assert sol.status in SOLVED
    _check_consistent(problem, sol)
    # the even split is the MIP start, so the ILP never does worse
    assert sol.objective <= even_partition(problem).objective * (1 + 1e-6)


def _skip_problem(charge: str) -> PartitionProblem:
    """Six equal units on three ranks; a heavy skip 0 -> 4. A rank holds 12 s; moving
    unit 4 onto chunk 1 costs 6 s of balance and saves one 10 s chunk crossing."""
    units = [_unit(f"u{i}", 1.0) for i in range(6)]
    edges = [UnitEdge(i, i + 1, 0.0) for i in range(5)] + [UnitEdge(0, 4, 30e9)]
    return PartitionProblem(units=units, edges=edges, stages=3, chunks=1, bandwidth_bytes_per_s=1e9, transfer_charge=charge)


def test_a_skip_is_charged_per_chunk_crossed_or_once():
    """Per chunk (the default), the skip pulls unit 4 onto the middle chunk; charged once,
    as the runtime sends a value straight to its reader, the even split stays optimal."""
    one_transfer = 30e9 / 1e9 / 3
    per_chunk = solve_partition(_skip_problem("per_chunk"))
    assert per_chunk.status == STATUS_OPTIMAL and per_chunk.chunk_of_unit == [0, 0, 1, 1, 1, 2]
    assert per_chunk.objective == pytest.approx(18.0 + one_transfer)
    once = solve_partition(_skip_problem("once"))
    assert once.status == STATUS_OPTIMAL and once.chunk_of_unit == [0, 0, 1, 1, 2, 2]
    assert once.objective == pytest.approx(12.0 + one_transfer)
    assert _evaluate(_skip_problem("per_chunk"), once.chunk_of_unit)[0] == pytest.approx(12.0 + 2 * one_transfer)
    with pytest.raises(PartitionError, match="transfer_charge"):
        solve_partition(_skip_problem("sometimes"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_problems(), st.sampled_from(["per_chunk", "once"]))
def test_ilp_optimum_is_the_best_split_by_enumeration(problem, charge):
    """Both charges are modelled exactly (the cut variables of far edges included): where
    CBC proves optimality, its objective is that of the best in-order split, found by
    evaluating every one."""
    problem.transfer_charge = charge
    sol = solve_partition(problem)
    best, _ = _best_chain_split(problem)
    if sol.status == STATUS_OPTIMAL:
        assert sol.objective == pytest.approx(_evaluate(problem, best)[0], rel=1e-4, abs=1e-9)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_problems(), st.floats(1.0, 1.6))
def test_random_chains_with_memory_cap(problem, slack):
    problem.memory_cap_bytes = _memory_lower_bound(problem) * slack
    try:
        sol = solve_partition(problem)
    except PartitionError as err:  # a cap no contiguous split meets: must be proven, with figures
        assert "proved" in str(err) and f"{problem.memory_cap_bytes:.6g}" in str(err)
        return
    assert sol.status in SOLVED
    _check_consistent(problem, sol)
    assert max(sol.rank_memory) <= problem.memory_cap_bytes * (1 + 1e-6)


def test_p8_k2_forty_units_balanced():
    rng = random.Random(7)
    problem = _chain([1e-3 * rng.uniform(0.97, 1.03) for _ in range(40)], stages=8, chunks=2, time_limit_s=25.0)
    even = even_partition(problem)
    sol = solve_partition(problem)
    assert sol.status in SOLVED
    _check_consistent(problem, sol)
    assert sol.imbalance <= 1.10
    assert sol.imbalance <= even.imbalance + 1e-9
    assert sol.num_variables < 1000 and sol.num_constraints < 1000
    assert sol.solve_seconds < 40.0


def test_fewer_units_than_chunks():
    with pytest.raises(PartitionError) as err:
        solve_partition(_chain([1.0] * 7, stages=4, chunks=2))
    msg = str(err.value)
    assert "V = K·P" in msg and "8" in msg and "7 units" in msg
    assert "fewer stages" in msg and "finer units" in msg
    with pytest.raises(PartitionError):
        even_partition(_chain([1.0] * 7, stages=4, chunks=2))


def test_edges_must_point_forward():
    problem = _chain([1.0] * 4, stages=2, chunks=1)
    problem.edges.append(UnitEdge(3, 1, 1.0))
    with pytest.raises(PartitionError, match="src must precede dst"):
        solve_partition(problem)


def test_memory_cap_below_lower_bound():
    problem = _chain([1.0] * 8, stages=2, chunks=1, microbatches_in_flight=2)
    lower = _memory_lower_bound(problem)  # (8 units · (4·1e6 + 2·1e7)) / 2 ranks
    assert lower == pytest.approx(8 * (4e6 + 2e7) / 2)
    problem.memory_cap_bytes = 0.8 * lower
    with pytest.raises(PartitionError) as err:
        solve_partition(problem)
    msg = str(err.value)
    assert f"{problem.memory_cap_bytes:.6g}" in msg and f"{lower:.6g}" in msg
    assert "more stages" in msg and "in-flight" in msg and "larger cap" in msg


def test_memory_cap_respected_when_feasible():
    costs = [1.0] * 8
    costs[0] = 6.0  # time wants unit 0 alone; memory below forbids rank 0 being too full
    problem = _chain(costs, stages=2, chunks=1)
    problem.memory_cap_bytes = _memory_lower_bound(problem) * 1.3
    sol = solve_partition(problem)
    _check_consistent(problem, sol)
    assert max(sol.rank_memory) <= problem.memory_cap_bytes * (1 + 1e-6)
    assert sol.chunk_of_unit == [0, 0, 0, 1, 1, 1, 1, 1]  # time alone would pick [0, 0, 1, ...]


def test_memory_cap_proven_infeasible_by_solver():
    # lower bound fits, but no contiguous split does: units 4 & 4 of memory 3,1,1,3 ...
    units = [Unit(f"u{i}", {"F": 1.0}, param_bytes=m / 4) for i, m in enumerate([3, 1, 3, 1])]
    problem = PartitionProblem(units, [UnitEdge(i, i + 1, 0.0) for i in range(3)], stages=2, chunks=1)
    problem.memory_cap_bytes = 4.0  # total 8 over 2 ranks: only {3,1}|{3,1} fits — it is contiguous
    sol = solve_partition(problem)
    assert sol.chunk_of_unit == [0, 0, 1, 1]
    problem.units[1].param_bytes, problem.units[2].param_bytes = 3 / 4, 1 / 4  # 3,3,1,1: no split fits
    with pytest.raises(PartitionError, match="proved") as err:
        solve_partition(problem)
    assert "4 B per rank" in str(err.value)


def test_time_limit_without_solution():
    rng = random.Random(3)
    units = [Unit(f"u{i}", {"F": rng.uniform(1, 3), "G": 1, "GG": 2, "FB": 2}, param_bytes=rng.uniform(1, 2)) for i in range(60)]
    edges = [UnitEdge(i, i + 1, 1e8) for i in range(59)]
    problem = PartitionProblem(units, edges, stages=8, chunks=2, time_limit_s=0.001)
    # a tight cap that the even split breaks, so CBC gets no MIP start
    problem.memory_cap_bytes = _memory_lower_bound(problem) * 1.02
    assert max(even_partition(problem).rank_memory) > problem.memory_cap_bytes
    try:
        sol = solve_partition(problem)
    except PartitionError as err:
        msg = str(err)
        assert "without a feasible partition" in msg and "time_limit_s" in msg
    else:  # CBC found one anyway: it must be flagged unproven (or be proven optimal) and valid
        assert sol.status in SOLVED
        _check_consistent(problem, sol)
        assert max(sol.rank_memory) <= problem.memory_cap_bytes * (1 + 1e-6)


def test_time_limited_solution_reports_gap():
    rng = random.Random(11)
    problem = _chain([rng.uniform(0.5, 2.0) for _ in range(60)], stages=8, chunks=2, time_limit_s=0.5)
    sol = solve_partition(problem)  # the even split is the MIP start: always feasible
    assert sol.status in SOLVED
    _check_consistent(problem, sol)
    if sol.status == STATUS_TIME_LIMIT:
        assert sol.bound is not None and sol.gap is not None and sol.gap >= 0.0


def test_deterministic():
    rng = random.Random(5)
    costs = [rng.uniform(0.5, 2.0) for _ in range(16)]
    first = solve_partition(_chain(costs, stages=3, chunks=2, seed=1))
    second = solve_partition(_chain(costs, stages=3, chunks=2, seed=1))
    assert first.status == STATUS_OPTIMAL
    assert first.chunk_of_unit == second.chunk_of_unit
    assert first.objective == second.objective


def _side_branch_problem(**kw) -> PartitionProblem:
    """u2 is read only by u4 (like a filter network computed from the geometry alone):
    the chain 0,1,2,3,4 cannot balance two ranks (best 6 / 4), the data flow can
    ({0, 1, 3} = 5 and {2, 4} = 5)."""
    units = [_unit(f"u{i}", c) for i, c in enumerate([1.0, 3.0, 3.0, 1.0, 2.0])]
    edges = [UnitEdge(0, 1, 0.0), UnitEdge(0, 2, 0.0), UnitEdge(1, 3, 0.0), UnitEdge(2, 4, 0.0), UnitEdge(3, 4, 0.0)]
    return PartitionProblem(units=units, edges=edges, stages=2, chunks=1, **kw)


def test_dag_order_balances_what_the_chain_cannot():
    chain = solve_partition(_side_branch_problem())
    dag_problem = _side_branch_problem(order="dag")
    dag = solve_partition(dag_problem, initial=chain.chunk_of_unit)
    _check_consistent(dag_problem, dag)
    assert chain.imbalance == pytest.approx(1.2)
    assert dag.status == STATUS_OPTIMAL and dag.imbalance == pytest.approx(1.0)
    assert dag.chunk_of_unit == [0, 0, 1, 0, 1]  # u2 before u3 in the order, after it in the pipeline


def test_dag_order_keeps_every_edge_pointing_up():
    problem = _side_branch_problem(order="dag")
    problem.edges.append(UnitEdge(2, 3, 0.0))  # now u3 needs u2: the balanced answer is gone
    sol = solve_partition(problem)
    _check_consistent(problem, sol)
    assert sol.imbalance == pytest.approx(1.2)


def test_unknown_order_is_rejected():
    with pytest.raises(PartitionError, match="order"):
        solve_partition(_side_branch_problem(order="sideways"))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_random_problems())
def test_random_dags_never_worse_than_their_chain(problem):
    chain = solve_partition(problem)
    problem.order = "dag"
    dag = solve_partition(problem, initial=chain.chunk_of_unit)
    assert dag.status in SOLVED
    _check_consistent(problem, dag)
    assert dag.objective <= chain.objective * (1 + 1e-6)


def test_alike_units_need_a_whole_unit_more_on_one_rank():
    # 9 equal units on 2 ranks: one rank holds 5. The even share (4.5 units) is not a bound
    # a partition can reach; a cap between 4.5 and 5 units is refused before any solve.
    problem = _chain([1.0] * 9, stages=2, chunks=2)
    one = problem.units[0].memory(problem.microbatches_in_flight)
    assert _memory_lower_bound(problem) == pytest.approx(5 * one)
    problem.memory_cap_bytes = 4.8 * one
    with pytest.raises(PartitionError, match="at least") as err:
        solve_partition(problem)
    assert f"{5 * one:.6g}" in str(err.value)


def test_tight_cap_without_a_fitting_start_is_settled_by_enumeration():
    # memory 3,3,1,1 under a cap of 4: the simple bounds fit, but no in-order split does.
    # The proof must not wait on CBC, so it holds with almost no time to solve.
    units = [Unit(f"u{i}", {"F": 1.0}, param_bytes=m / 4) for i, m in enumerate([3, 3, 1, 1])]
    problem = PartitionProblem(units, [UnitEdge(i, i + 1, 0.0) for i in range(3)], stages=2, chunks=1, time_limit_s=1e-3)
    problem.memory_cap_bytes = 4.0
    assert _memory_lower_bound(problem) <= problem.memory_cap_bytes
    with pytest.raises(PartitionError, match="evaluating all 3 in-order splits proved"):
        solve_partition(problem)
    # memory 5,1,1,1,1,1 under a cap of 5: the even and the cost-quantile split (3 | 3)
    # hold 7 on rank 0; the one split that fits (1 | 5) is found and kept
    units = [Unit(f"u{i}", {"F": 1.0}, param_bytes=m / 4) for i, m in enumerate([5, 1, 1, 1, 1, 1])]
    problem = PartitionProblem(units, [UnitEdge(i, i + 1, 0.0) for i in range(5)], stages=2, chunks=1)
    problem.memory_cap_bytes = 5.0
    assert max(even_partition(problem).rank_memory) > problem.memory_cap_bytes
    sol = solve_partition(problem)
    _check_consistent(problem, sol)
    assert sol.chunk_of_unit == [0, 1, 1, 1, 1, 1]
