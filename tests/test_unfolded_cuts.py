"""1F1B's cut search (`passes/unfolded_cuts.py`): it never makes the baseline slower,
finds faster cuts where transfers matter, and its splits stay exact."""
from __future__ import annotations

import logging
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_symfold import assert_plan_exact, setup

from janus_compile.passes.split import FOLDED, UNFOLDED, split_graph
from janus_compile.passes.symfold import _linear_cuts, partition_graph, unfolded_chain, unfolded_stage_of_nodes
from janus_compile.passes.unfolded_cuts import SCORE_MICROBATCHES_PER_STAGE, cuts_of, piece_of
from janus_compile.passes.wavek import PipelineDAG, evaluate_orders, one_f_one_b


def _step(part, bandwidth):
    dag = PipelineDAG.from_partition(part, SCORE_MICROBATCHES_PER_STAGE * part.stages, bandwidth_bytes_per_s=bandwidth)
    return evaluate_orders(dag, one_f_one_b(dag))


def _dp_stages(gm, part):
    """Stage of every unit node under the DP's cuts of ``part``'s chain."""
    chain, cost = unfolded_chain(part.units, part.problem)
    return unfolded_stage_of_nodes(gm.graph, part.units, chain, _linear_cuts(cost, part.stages))


def _on_dp_stages(gm, part):
    """Whether every unit node of ``part`` sits where the DP's cuts put it."""
    placed = part.plan.placement.chunk
    return all(placed[n] == s for n, s in _dp_stages(gm, part).items() if n in placed)


@pytest.mark.parametrize("name,stages", [("schnet", 4), ("painn", 3)])
def test_search_shortens_1f1b_where_transfers_matter_and_stays_exact(name, stages):
    """At 1 GB/s the DP's cuts (compute only) send more on 1F1B's round trip than cuts a
    few items away: the searched split is faster in the simulator and still reproduces
    eager's loss, forces and gradients."""
    gm = setup(name)[1].gm
    bandwidth = 1e9
    dp = partition_graph(gm, stages, 1, "unfolded", time_limit_s=10, bandwidth_bytes_per_s=bandwidth, search_cuts=False)
    searched = partition_graph(gm, stages, 1, "unfolded", time_limit_s=10, bandwidth_bytes_per_s=bandwidth)
    assert _on_dp_stages(gm, dp)  # search_cuts=False: the DP's cuts
    assert searched.units.names == dp.units.names and not _on_dp_stages(gm, searched)
    assert _step(searched, bandwidth) < 0.95 * _step(dp, bandwidth)
    assert_plan_exact(name, searched, f"unfolded P={stages}, cuts searched")


def test_search_keeps_the_dp_cuts_when_links_are_free_and_respects_its_budget(caplog):
    gm = setup("schnet")[1].gm
    dp = partition_graph(gm, 3, 1, "unfolded", time_limit_s=10, bandwidth_bytes_per_s=1e14, search_cuts=False)
    fast_links = partition_graph(gm, 3, 1, "unfolded", time_limit_s=10, bandwidth_bytes_per_s=1e14)
    assert _step(fast_links, 1e14) <= _step(dp, 1e14) * (1 + 1e-12)
    assert "stopped at its" not in caplog.text
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="janus_compile.passes.unfolded_cuts"):
        tiny = partition_graph(gm, 4, 1, "unfolded", time_limit_s=1e-6, bandwidth_bytes_per_s=1e9)
    assert time.perf_counter() - t0 < 30
    assert "stopped at its" in caplog.text  # a search cut short says so
    dp4 = partition_graph(gm, 4, 1, "unfolded", time_limit_s=1e-6, bandwidth_bytes_per_s=1e9, search_cuts=False)
    assert _step(tiny, 1e9) <= _step(dp4, 1e9) * (1 + 1e-12)


@pytest.mark.parametrize("method,stages,chunks", [("symfold", 2, 2), ("unfolded", 3, 1)])
def test_a_plan_built_to_simulate_has_the_full_plans_groups(method, stages, chunks):
    """split_graph(build_modules=False), which the search simulates, gives every group
    the nodes, inputs and outputs the runnable plan gives it."""
    gm = setup("painn")[1].gm
    part = partition_graph(gm, stages, chunks, method, time_limit_s=10, search_cuts=False)
    layout = UNFOLDED if method == "unfolded" else FOLDED
    override = _dp_stages(gm, part) if method == "unfolded" else None
    chunk_of_unit = part.chunk_of_unit or [0] * len(part.units.names)
    full = split_graph(gm, part.units, chunk_of_unit, stages * chunks, layout, chunk_override=override)
    light = split_graph(gm, part.units, chunk_of_unit, stages * chunks, layout, chunk_override=override, build_modules=False)
    assert light.order == full.order and set(light.groups) == set(full.groups)
    for key, g in full.groups.items():
        h = light.groups[key]
        assert h.gm is None and (h.nodes, h.outputs) == (g.nodes, g.outputs) and sorted(h.inputs) == sorted(g.inputs), key


@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_cuts_and_pieces_are_inverse(steps):
    piece = [sum(steps[1 : k + 1]) for k in range(len(steps))]  # contiguous stages from 0
    assert piece_of(cuts_of(piece), len(piece)) == piece
