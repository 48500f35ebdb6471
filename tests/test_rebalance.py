"""Rebalancing: a split whose groups measure out of balance is solved again on node times
corrected by those measurements, and the trainer keeps whichever split's schedule
simulates faster."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import janus_compile
from conftest import SlowGroup, random_batch
from janus_compile import EnergyForceLoss
from janus_compile.models import build_model
from janus_compile.options import JanusOptions, OptionsError
from janus_compile.passes.rebalance import (
    REBALANCE_TARGET,
    corrected_node_times,
    group_factors,
    measured_imbalance,
    measured_rank_times,
)
from janus_compile.passes.symfold import partition_graph


def _model():
    torch.manual_seed(0)
    return build_model("schnet", hidden=8, num_interactions=6, num_rbf=6, cutoff=3.5).double().train()


def _joint(model, batch):
    return janus_compile.compile(model, loss=EnergyForceLoss()).joint_graph(batch)


def _rank_of_node(part, name):
    return part.rank_of_chunk(part.plan.placement.chunk[name])


@pytest.mark.parametrize("method", ["symfold", "unfolded"])
def test_corrected_times_scale_each_node_by_its_groups_measured_ratio(method):
    joint = _joint(_model(), random_batch(5, 3))
    part = partition_graph(joint.gm, 2, 1, method)
    estimated = part.chunk_phase_time()
    # rank 1's groups measured at 3x their node times, rank 0's as estimated
    part.group_times = {key: t * (3.0 if part.rank_of_chunk(key[0]) == 1 else 1.0) for key, t in estimated.items()}
    factors = group_factors(part)
    assert factors and all(f == pytest.approx(3.0 if part.rank_of_chunk(k[0]) == 1 else 1.0) for k, f in factors.items())
    corrected = corrected_node_times(part)
    placement = part.plan.placement
    for name, chunk in placement.chunk.items():
        if name in part.node_times:
            expected = part.node_times[name] * (3.0 if part.rank_of_chunk(chunk) == 1 else 1.0)
            assert corrected[name] == pytest.approx(expected)
    rank = measured_rank_times(part)
    estimated_rank = part.rank_times()
    assert rank == pytest.approx([estimated_rank[0], 3.0 * estimated_rank[1]])
    assert measured_imbalance(part) == pytest.approx(max(rank) / (sum(rank) / 2))
    assert measured_imbalance(part) > REBALANCE_TARGET


def test_no_group_times_means_no_correction():
    joint = _joint(_model(), random_batch(5, 3))
    part = partition_graph(joint.gm, 2, 1, "symfold")
    assert measured_rank_times(part) == [] and measured_imbalance(part) == 1.0
    assert corrected_node_times(part) == part.node_times


@pytest.mark.parametrize("method", ["symfold", "unfolded"])
def test_solving_on_corrected_times_moves_work_off_the_slow_rank(method):
    """The slow rank's groups measured at 3x: the second solve gives it fewer nodes, and
    on the corrected times it balances better than the first split does."""
    joint = _joint(_model(), random_batch(5, 3))
    first = partition_graph(joint.gm, 2, 1, method)
    first.group_times = {k: t * (3.0 if first.rank_of_chunk(k[0]) == 1 else 1.0) for k, t in first.chunk_phase_time().items()}
    corrected = corrected_node_times(first)
    second = partition_graph(joint.gm, 2, 1, method, node_times=corrected)
    on_rank1 = lambda part: sum(1 for n in part.plan.placement.chunk if _rank_of_node(part, n) == 1)  # noqa: E731
    assert on_rank1(second) < on_rank1(first)
    assert second.imbalance() < dataclasses.replace(first, node_times=corrected).imbalance()


def _slow_rank(part, rank: int, delay: float) -> None:
    """Every group of ``rank`` slowed, ``delay`` seconds in all."""
    keys = [key for key in part.plan.groups if part.rank_of_chunk(key[0]) == rank]
    for key in keys:
        part.plan.groups[key] = dataclasses.replace(part.plan.groups[key], gm=SlowGroup(part.plan.groups[key].gm, delay / len(keys)))


def test_compiled_solves_again_only_where_the_groups_measure_out_of_balance():
    model = _model()
    batch = random_batch(5, 3)
    compiled = janus_compile.compile(model, loss=EnergyForceLoss(), stages=2, microbatches=2)
    part = compiled.partition(batch)
    # rank 1 made slow by hand: its groups measure far out of balance
    _slow_rank(part, 1, 0.08)
    compiled.time_groups(batch, [part])
    (alt,) = compiled.rebalanced(batch, [part])
    assert alt is not None and (alt.method, alt.chunks) == (part.method, part.chunks)
    on_rank1 = lambda p: sum(1 for n in p.plan.placement.chunk if _rank_of_node(p, n) == 1)  # noqa: E731
    assert on_rank1(alt) < on_rank1(part)
    # both timed again in one sitting: the slowed rank still shows, the new split is faster
    assert set(alt.group_times) == set(alt.plan.groups)
    assert measured_imbalance(part) > REBALANCE_TARGET
    assert max(measured_rank_times(alt)) < max(measured_rank_times(part))
    # both ranks slowed alike: balanced as measured, nothing solved again
    _slow_rank(alt, 0, 0.3)
    _slow_rank(alt, 1, 0.3)
    compiled.time_groups(batch, [alt])
    assert measured_imbalance(alt) <= REBALANCE_TARGET
    assert compiled.rebalanced(batch, [alt]) == [None]
    # switched off: the measured imbalance is left alone
    off = janus_compile.compile(model, loss=EnergyForceLoss(), stages=2, microbatches=2, rebalance=False)
    part_off = off.partition(batch)
    _slow_rank(part_off, 1, 0.08)
    off.time_groups(batch, [part_off])
    assert measured_imbalance(part_off) > REBALANCE_TARGET and off.rebalanced(batch, [part_off]) == [None]


@pytest.mark.parametrize("slow", ["first", "alternative"])
def test_trainer_keeps_the_split_whose_schedule_simulates_faster(monkeypatch, tmp_path, slow):
    """An alternative split (here the `even` one, standing in for a rebalanced one) is
    scheduled beside the first; the one that simulates faster is the trainer's and the
    compiled model's partition, and the dump says what it replaced."""
    from janus_compile.compiled import CompiledMLIP
    from janus_compile.pipeline import PipelineTrainer

    def alternatives(self, batch, partitions):
        alts = [partition_graph(self.joint_graph(batch).gm, p.stages, p.chunks, "even") for p in partitions]
        self.time_groups(batch, list(partitions) + alts)
        slowed = partitions[0] if slow == "first" else alts[0]
        # rank 1 measured 10x slower (the split graphs must stay picklable: times edited)
        slowed.group_times = {k: t * (10.0 if slowed.rank_of_chunk(k[0]) == 1 else 1.0) for k, t in slowed.group_times.items()}
        return alts

    monkeypatch.setattr(CompiledMLIP, "rebalanced", alternatives)
    batch = random_batch(5, 4)
    trainer = PipelineTrainer(_model(), batch, stages=2, chunks=1, microbatches=2, copy_cost=None, dump_dir=str(tmp_path))
    info = trainer.programs.meta["rebalance"]
    assert info["kept"] == (slow == "first")
    assert trainer.programs.meta["simulated"]["makespan_s"] == pytest.approx(
        info["rebalanced_simulated_step_s"] if info["kept"] else info["simulated_step_s"]
    )
    assert (trainer.partition.method == "even") == info["kept"]
    report = json.loads((tmp_path / "partition.json").read_text())
    assert report["method"] == trainer.partition.method
    assert bool(report["rebalanced_from_rank_times_s"]) == info["kept"]
    # the group times the schedule used (timed again with the alternative), not the first timing's
    dumped = {(row["chunk"], row["group"]): row["seconds"] for row in report["group_times_s"]}
    assert dumped == pytest.approx(trainer.partition.group_times)


def test_rebalance_option_must_be_a_bool():
    with pytest.raises(OptionsError, match="rebalance"):
        JanusOptions(rebalance="yes").validate()
