"""Segments: heavy units cut into pieces of their own code, with the fold kept and the split exact."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close
from test_symfold import check_fold_and_directions, setup

from janus_compile.passes.cost import graph_costs
from janus_compile.passes.labels import PHASE
from janus_compile.passes.segments import segment_units
from janus_compile.passes.split import split_graph
from janus_compile.passes.symfold import Partition, partition_graph
from janus_compile.passes.units import build_units

SIZES = {"atoms": 1000, "edges": 30000, "structures": 10}


def _proxy_times(graph):
    return {name: c.evaluate(SIZES)[0] * 1e-10 + c.evaluate(SIZES)[1] * 1e-10 + 2e-6 for name, c in graph_costs(graph).items()}


def _segmented(name):
    _, joint, flat, ref = setup(name)
    graph = joint.gm.graph
    units = build_units(graph, min_units=1, min_depth=1, max_depth=1)
    times = _proxy_times(graph)
    out_bytes = {n: c.evaluate(SIZES)[2] for n, c in graph_costs(graph).items()}
    total = sum(times.values())
    # a chunk share small enough that every block is heavy: cut as finely as the fold allows
    cut = segment_units(graph, units, times, out_bytes, total / (4 * len(units.names)))
    return joint, flat, ref, units, cut


@pytest.mark.parametrize("name", ["schnet", "painn", pytest.param("nequip", marks=pytest.mark.slow)])  # NequIP: 15-20 s on 2 cores
def test_every_segment_on_its_own_chunk_reproduces_eager(name):
    """The hardest placement for the fold: each segment alone on a chunk of its own."""
    joint, flat, ref, units, cut = _segmented(name)
    assert len(cut.names) > len(units.names), "no unit was cut"
    assert any("#" in n for n in cut.names)
    V = len(cut.names)
    plan = split_graph(joint.gm, cut, list(range(V)), V)
    # only sums of gradient contributions may leave the chunk of the node they fold onto
    by_name = {n.name: n for n in joint.gm.graph.nodes}
    assert all(by_name[n].target is torch.ops.aten.add.Tensor for n in plan.placement.moved), plan.placement.moved
    outs = plan.run(flat)
    names = ["loss"] + joint.output_names + [f"grad_{p}" for p in joint.param_names]
    for key, got in zip(names, outs):
        assert_rel_close(got, ref[key], 1e-10, f"{name} segmented V={V} {key}")


def test_segments_keep_forward_order_and_cover_every_forward_node():
    joint, _, _, units, cut = _segmented("painn")
    graph = joint.gm.graph
    forward = [n.name for n in graph.nodes if n.meta.get(PHASE) == "F" and n.name in units.unit_of_node]
    assert {n for n in forward} <= set(cut.unit_of_node)
    for u in range(len(units.names)):
        # a unit's segments are contiguous pieces of its forward nodes in graph order
        seen = [cut.unit_of_node[n] for n in forward if units.unit_of_node[n] == u]
        assert seen == sorted(seen), units.names[u]
        # and a segment never mixes two original units
        assert {cut.names[s].split("#")[0] for s in seen} == {units.names[u]}


def test_partition_balances_a_model_whose_blocks_are_single_units():
    """PaiNN's message code is one unit per block: at P = 8 only cutting inside it balances."""
    _, joint, flat, ref = setup("painn")
    times = _proxy_times(joint.gm.graph)
    part: Partition = partition_graph(joint.gm, 8, 1, "symfold", node_times=times, sizes=SIZES, time_limit_s=20)
    assert any("#" in n for n in part.units.names), "SymFold did not segment"
    assert part.imbalance() <= 1.10, part.imbalance()
    check_fold_and_directions(part)
    outs = part.plan.run(flat)
    names = ["loss"] + joint.output_names + [f"grad_{p}" for p in joint.param_names]
    for key, got in zip(names, outs):
        assert_rel_close(got, ref[key], 1e-10, f"painn P=8 {key}")


@pytest.mark.parametrize("stages,share", [(4, 0.6), (2, 0.8)])  # P = 2: the coarse and fine units are the same
def test_unfolded_baseline_is_segmented_where_its_chain_cannot_balance(stages, share):
    """1F1B's baseline gets the same finer units: a heavy unit (here a prologue made 60 or
    80 % of the work) is cut into segments until the chain balances, and the split stays
    exact."""
    _, joint, flat, ref = setup("schnet")
    times = _proxy_times(joint.gm.graph)
    units = build_units(joint.gm.graph, min_units=1, min_depth=1, max_depth=1)
    prologue = [n for n, u in units.unit_of_node.items() if units.names[u] == "<prologue>"]
    assert prologue
    heavy = sum(times[n] for n in prologue)
    scale = share / (1 - share) * (sum(times.values()) - heavy) / heavy  # the prologue's share of the step
    times = {n: t * scale if n in prologue else t for n, t in times.items()}
    part: Partition = partition_graph(joint.gm, stages, 1, "unfolded", node_times=times, sizes=SIZES)
    assert any("#" in n for n in part.units.names), "the unfolded baseline was not segmented"
    assert part.imbalance() <= 1.10, part.imbalance()
    outs = part.plan.run(flat)
    names = ["loss"] + joint.output_names + [f"grad_{p}" for p in joint.param_names]
    for key, got in zip(names, outs):
        assert_rel_close(got, ref[key], 1e-10, f"schnet unfolded P={stages} {key}")
