"""Group timing: every split graph timed as the runtime runs it, and the schedule built on it."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os

import pytest
import torch

import janus_compile
from conftest import PidLoggingGroup, SlowGroup, random_batch
from janus_compile import EnergyForceLoss
from janus_compile.models import build_model
from janus_compile.passes.group_timing import measure_group_times
from janus_compile.passes.symfold import partition_graph
from janus_compile.passes.wavek import PipelineDAG


def _model():
    torch.manual_seed(0)
    return build_model("schnet", hidden=8, num_interactions=4, num_rbf=6, cutoff=3.5).double().train()


def _joint_and_inputs(model, batch):
    joint = janus_compile.compile(model, loss=EnergyForceLoss()).joint_graph(batch)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    return joint, joint.flat_inputs(params, buffers, batch)


def test_every_group_is_timed_and_a_slow_one_shows():
    model = _model()
    joint, flat = _joint_and_inputs(model, random_batch(5, 3))
    even = partition_graph(joint.gm, 2, 2, "even")
    unfolded = partition_graph(joint.gm, 2, 1, "unfolded")
    slow_key = sorted(even.plan.groups)[0]
    even.plan.groups[slow_key] = dataclasses.replace(even.plan.groups[slow_key], gm=SlowGroup(even.plan.groups[slow_key].gm, 0.05))
    timed_even, timed_unfolded = measure_group_times([(even.plan, flat), (unfolded.plan, flat)], repeats=2)
    assert set(timed_even) == set(even.plan.groups) and set(timed_unfolded) == set(unfolded.plan.groups)
    assert all(t > 0 for t in [*timed_even.values(), *timed_unfolded.values()])
    assert timed_even[slow_key] >= 0.05
    assert max(t for k, t in timed_even.items() if k != slow_key) < 0.05
    with pytest.raises(ValueError, match="repeats"):
        measure_group_times([(even.plan, flat)], repeats=0)


def _logging_plan(part, path, **kw):
    """``part``'s plan with every group logging which process ran it."""
    groups = {k: dataclasses.replace(g, gm=PidLoggingGroup(g.gm, str(path), os.getpid(), **kw)) for k, g in part.plan.groups.items()}
    return dataclasses.replace(part.plan, groups=groups)


def test_contenders_run_the_same_groups_beside_the_timing_and_are_stopped(tmp_path):
    """The ranks of a local run share the host: with contenders, other processes run the
    same group graphs while the parent times them, and none outlives the call."""
    model = _model()
    joint, flat = _joint_and_inputs(model, random_batch(5, 3))
    part = partition_graph(joint.gm, 2, 2, "even")
    log_path = tmp_path / "pids.txt"
    plan = _logging_plan(part, log_path)
    alone = measure_group_times([(plan, flat)], repeats=2)[0]
    assert set(log_path.read_text().split()) == {str(os.getpid())}
    log_path.unlink()
    beside = measure_group_times([(plan, flat)], repeats=2, contenders=2)[0]
    pids = set(log_path.read_text().split())
    assert str(os.getpid()) in pids and len(pids) == 3  # the parent and two contenders ran groups
    assert set(beside) == set(alone) == set(part.plan.groups) and all(t > 0 for t in beside.values())
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="contenders must be >= 0"):
        measure_group_times([(plan, flat)], contenders=-1)
    with pytest.raises(ValueError, match="contenders apply to CPU timing"):
        measure_group_times([(plan, flat)], device="cuda", contenders=1)


def test_a_failing_contender_is_reported_and_nothing_is_left_running(tmp_path):
    """A contender that dies before its first pass, or after it while the parent times (the
    times would be taken beside fewer processes than asked), raises; none is left running."""
    model = _model()
    joint, flat = _joint_and_inputs(model, random_batch(5, 3))
    part = partition_graph(joint.gm, 2, 1, "even")
    plan = _logging_plan(part, tmp_path / "pids.txt", fail_elsewhere=True)
    with pytest.raises(RuntimeError, match="contender process for group timing exited with code 1 before its first pass"):
        measure_group_times([(plan, flat)], repeats=1, contenders=1)
    assert multiprocessing.active_children() == []
    # every group runs once in the contender (its first pass) and fails on its second call,
    # while the parent sleeps 0.2 s per group it times
    plan = _logging_plan(part, tmp_path / "pids.txt", fail_elsewhere=True, fail_after=1, owner_delay=0.2)
    with pytest.raises(RuntimeError, match="1 of 1 contender process.*exited \\(code 1\\) while the groups were timed"):
        measure_group_times([(plan, flat)], repeats=1, contenders=1)
    assert multiprocessing.active_children() == []


def test_the_dag_costs_the_measured_groups_where_every_group_was_timed():
    model = _model()
    joint, flat = _joint_and_inputs(model, random_batch(5, 3))
    part = partition_graph(joint.gm, 2, 2, "even")
    node_sums = PipelineDAG.from_partition(part, 4).cost
    timed = {key: 1.0 + i for i, key in enumerate(sorted(part.plan.groups))}
    assert PipelineDAG.from_partition(dataclasses.replace(part, group_times=timed), 4).cost == timed
    # one group missing: the times do not describe this plan, so the node times are used
    partial = dict(list(timed.items())[1:])
    assert PipelineDAG.from_partition(dataclasses.replace(part, group_times=partial), 4).cost == node_sums


def test_trainer_schedules_on_group_times_and_dumps_them(tmp_path):
    from janus_compile.pipeline import PipelineTrainer

    batch = random_batch(5, 4)
    trainer = PipelineTrainer(_model(), batch, stages=2, chunks=1, microbatches=2, dump_dir=str(tmp_path))
    part = trainer.partition
    assert set(part.group_times) == set(part.plan.groups)
    dag = PipelineDAG.from_partition(part, 2)
    assert dag.cost == part.group_times
    report = json.loads((tmp_path / "partition.json").read_text())
    dumped = {(row["chunk"], row["group"]): row["seconds"] for row in report["group_times_s"]}
    assert dumped == pytest.approx(part.group_times)
    assert "measured ms" in (tmp_path / "partition.md").read_text()
    # uncalibrated (the FLOP/byte proxy): nothing is timed, the node costs are the schedule's
    plain = PipelineTrainer(_model(), batch, stages=2, chunks=1, microbatches=2, calibrate=False)
    assert plain.partition.group_times == {}


def test_link_bandwidth_reaches_the_schedule_not_the_ilp():
    from janus_compile.options import JanusOptions
    from janus_compile.pipeline import PipelineTrainer

    assert JanusOptions().link_bytes_per_s == 25e9  # auto
    assert JanusOptions(device="cuda").link_bytes_per_s == 25e9
    assert JanusOptions(link_gb_s=3).link_bytes_per_s == 3e9
    batch = random_batch(5, 4)
    slow = PipelineTrainer(_model(), batch, stages=2, chunks=2, microbatches=2, link_gb_s=1e-4, calibrate=False)
    fast = PipelineTrainer(_model(), batch, stages=2, chunks=2, microbatches=2, link_gb_s=1e4, calibrate=False)
    # the ILP's transfer weight stays its own: the same partition either way
    assert slow.partition.problem.bandwidth_bytes_per_s == fast.partition.problem.bandwidth_bytes_per_s == 10e9
    assert slow.partition.chunk_of_unit == fast.partition.chunk_of_unit
    assert slow.pipeline_dag().bandwidth_bytes_per_s == 1e5 and fast.pipeline_dag().bandwidth_bytes_per_s == 1e13
    # at 100 kB/s the boundary tensors dominate the simulated step
    assert slow.programs.meta["simulated"]["makespan_s"] > 10 * fast.programs.meta["simulated"]["makespan_s"]


def test_chunks_auto_compares_k_on_groups_timed_together(monkeypatch):
    """With chunks='auto' the candidate partitions are timed in one interleaved sitting
    before the simulator compares them; the kept one schedules on those times (rebalance
    off: it would time a split again where the tiny model's groups measure unbalanced)."""
    from janus_compile.passes import group_timing
    from janus_compile.pipeline import PipelineTrainer

    calls = []
    real = group_timing.measure_group_times

    def spy(runs, *args, **kw):
        out = real(runs, *args, **kw)
        calls.append((len(runs), out))
        return out

    monkeypatch.setattr(group_timing, "measure_group_times", spy)
    trainer = PipelineTrainer(_model(), random_batch(5, 4), stages=2, chunks="auto", microbatches=2, copy_cost=None, rebalance=False)
    # K = 1 is timed with the joint graph (its partition is made there), the other K's
    # only with all together: the sitting that decides
    ks = sorted(trainer.chunks_tried)
    assert ks[:2] == [1, 2] and [n for n, _ in calls] == [1, len(ks)]
    together = calls[-1][1][ks.index(trainer.chunks)]
    assert trainer.partition.group_times == together
    assert trainer.pipeline_dag().cost == {key: together[key] for key in trainer.partition.plan.groups}
