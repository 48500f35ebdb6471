"""Geometry replication: data-only forward values recomputed on the chunks that read them."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_rel_close, random_batch
from test_pipeline import LOSS, _eager, _model
from test_symfold import check_fold_and_directions, setup

from janus_compile.dump import partition_markdown, partition_report
from janus_compile.passes.labels import PHASE
from janus_compile.passes.replicate import COPY_SUFFIX, choose_replicated, data_only_values
from janus_compile.passes.symfold import partition_graph
from janus_compile.pipeline import PipelineTrainer


def _crossing(part):
    """Names of values read by a group on another chunk than the one that produced them."""
    producer = {o: key for key, g in part.plan.groups.items() for o in g.outputs}
    return {i for key, g in part.plan.groups.items() for i in g.inputs if i in producer and producer[i][0] != key[0]}


FAST_CASES = {("schnet", 4, 1), ("painn", 2, 2)}
CASES = [
    pytest.param(name, p, k, marks=() if (name, p, k) in FAST_CASES else pytest.mark.slow)
    for name in ("schnet", "painn", "nequip")
    for p, k in ((4, 1), (2, 2))
]


@pytest.mark.parametrize("name,stages,chunks", CASES)
def test_replicated_split_reproduces_eager_and_sends_no_replicated_value(name, stages, chunks):
    _, joint, flat, ref = setup(name)
    never = partition_graph(joint.gm, stages, chunks, "symfold", time_limit_s=10, replicate="never")
    part = partition_graph(joint.gm, stages, chunks, "symfold", time_limit_s=10, replicate="always")
    outs = part.plan.run(flat)
    names = ["loss"] + joint.output_names + [f"grad_{p}" for p in joint.param_names]
    for key, got in zip(names, outs):
        assert_rel_close(got, ref[key], 1e-10, f"{name} P={stages} K={chunks} replicated {key}")
    check_fold_and_directions(part)
    data_only = data_only_values(joint.gm.graph)
    # without replication geometry crosses chunks; with it, no data-only value does
    assert _crossing(never) & data_only
    assert not (_crossing(part) & data_only)
    copies = [n for g in part.plan.groups.values() for n in g.nodes if COPY_SUFFIX in n]
    assert copies and all(part.plan.placement.phase[c] == "F" for c in copies)
    # the original joint graph is left as it was
    assert not any(COPY_SUFFIX in n.name for n in joint.gm.graph.nodes)
    # and the dump says what was recomputed where
    report = partition_report(part)
    assert report["replicated_on_readers"] and "recomputed on the chunks" in partition_markdown(report)


def test_data_only_values_exclude_everything_that_reads_a_parameter():
    _, joint, _, _ = setup("schnet")
    graph = joint.gm.graph
    data_only = data_only_values(graph)
    by_name = {n.name: n for n in graph.nodes}
    assert data_only, "geometry must be found"
    for name in data_only:
        node = by_name[name]
        assert node.meta[PHASE] == "F"
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            for m in n.all_input_nodes:
                assert not m.name.startswith("param_"), f"{name} depends on {m.name}"
                if m not in seen:
                    seen.add(m)
                    stack.append(m)


def test_auto_replicates_only_what_is_cheaper_than_sending_it():
    _, joint, _, _ = setup("schnet")
    graph = joint.gm.graph
    out_bytes = {n.name: 1e6 for n in graph.nodes}
    assert choose_replicated(graph, {n.name: 1e-6 for n in graph.nodes}, out_bytes, 1e9, "auto")  # cheap recompute
    assert not choose_replicated(graph, {n.name: 1.0 for n in graph.nodes}, out_bytes, 1e9, "auto")  # dear recompute
    assert not choose_replicated(graph, {}, out_bytes, 1e9, "never")
    with pytest.raises(ValueError, match="replicate"):
        choose_replicated(graph, {}, out_bytes, 1e9, "sometimes")


@pytest.mark.distributed
def test_replicated_pipeline_gradients_equal_eager():
    """Real processes: every rank recomputes the geometry it reads from its own batch copy."""
    model = _model()
    batch = random_batch(3, 4)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks=2, microbatches=2, schedule="wavek", calibrate=False, replicate="always")
    assert any(COPY_SUFFIX in n for g in trainer.partition.plan.groups.values() for n in g.nodes)
    out = trainer.gradients(batch)
    ref_loss, ref_grads = _eager(model, batch)
    assert_rel_close(torch.tensor(out.loss, dtype=torch.float64), ref_loss, 1e-10, "loss")
    for name, g in ref_grads.items():
        assert_rel_close(out.grads[name], g, 1e-10, f"replicated grad {name}")


def test_folded_plan_with_moved_boundaries_replicates_again_and_stays_exact():
    """`folded_plan` rebuilds a folded split for another unit -> chunk assignment (the
    chunk-boundary study moves them): the replicated values are copied for the new
    readers, nothing data-only crosses chunks and the step is eager's."""
    from janus_compile.passes.symfold import folded_plan
    from janus_compile.passes.unfolded_cuts import cuts_of, piece_of

    _, joint, flat, ref = setup("painn")
    part = partition_graph(joint.gm, 2, 2, "symfold", time_limit_s=10, replicate="always")
    cuts = cuts_of(part.chunk_of_unit)
    n = len(part.chunk_of_unit)
    moved = next(
        c for i in range(len(cuts)) for c in (cuts[:i] + [cuts[i] + 1] + cuts[i + 1 :], cuts[:i] + [cuts[i] - 1] + cuts[i + 1 :])
        if all(a < b for a, b in zip([0] + c, c + [n]))
    )
    plan, node_times, out_bytes, replicas = folded_plan(
        joint.gm, part.units, piece_of(moved, n), 4, data_only_values(joint.gm.graph), part.node_times, part.out_bytes
    )  # replicate="always": every data-only value
    assert plan.placement.chunk != part.plan.placement.chunk and replicas
    assert all(c in node_times and c in out_bytes for g in plan.groups.values() for c in g.nodes if COPY_SUFFIX in c)
    other = dataclasses.replace(part, plan=plan, node_times=node_times, out_bytes=out_bytes, replicas=replicas)
    assert not (_crossing(other) & data_only_values(joint.gm.graph))
    names = ["loss"] + joint.output_names + [f"grad_{p}" for p in joint.param_names]
    for key, got in zip(names, plan.run(flat)):
        assert_rel_close(got, ref[key], 1e-10, f"painn P=2 K=2, a boundary moved, {key}")
