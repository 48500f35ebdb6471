"""What a message costs the ranks' CPUs: the simulator charges it, the probe measures it.

The timing tests use synthetic DAGs whose makespan can be worked out by hand; the probe
test runs the real two-process gloo measurement.
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from janus_compile.options import JanusOptions, OptionsError
from janus_compile.passes.wavek import (
    PipelineDAG,
    build_programs,
    evaluate_orders,
    gantt_svg,
    gpipe,
    make_programs,
    one_f_one_b,
    simulate,
    wavek,
)
from janus_compile.passes.copy_cost import CopyCost, MeasuredCopyCost, copy_cost_from_json
from janus_compile.runtime.copy_probe import measure_copy_cost

PHASES = {"F": 1.0, "G": 1.5, "GG": 2.0, "FB": 1.2}


def _chain(
    microbatches: int = 1, per_message: float = 0.0, per_byte: float = 0.0, boundary: float = 1e6, per_tensor: float = 0.0
) -> PipelineDAG:
    dag = PipelineDAG.synthetic(
        2, 1, microbatches, phase_cost=PHASES, boundary_bytes=boundary, stash_bytes=5e5, bandwidth_bytes_per_s=1e9, latency_s=1e-3
    )
    return dataclasses.replace(dag, copy_cost=CopyCost(per_message, per_tensor, per_byte))


def test_one_microbatch_pays_one_copy_per_crossing_on_its_critical_path():
    """P = 2, K = 1, M = 1: the four phases cross ranks four times, one after the other.
    The receiver waits each time, and reads the socket while the sender writes it, so a
    crossing adds the latency and the longer of the link time and one copy; each rank is
    still charged its own copy of every message (eight in all)."""
    a, pt, pb, b = 0.02, 0.005, 1e-8, 1e6
    dag = _chain(1, a, pb, b, pt)
    programs = build_programs(dag, gpipe(dag))
    res = simulate(programs, dag)
    compute = 2 * sum(PHASES.values())  # two chunks, each a rank's share of every phase
    copy = a + pt + pb * b  # one tensor per message
    assert copy > b / 1e9  # the copy, not the link, is the longer
    expected = compute + 4 * (1e-3 + copy)
    assert res.makespan == pytest.approx(expected, rel=1e-12)
    assert evaluate_orders(dag, gpipe(dag)) == pytest.approx(expected, rel=1e-12)
    assert len(res.copies) == 8 and all(t1 - t0 == pytest.approx(copy) for _, t0, t1, _ in res.copies)
    assert sum(res.busy) == pytest.approx(compute)  # busy stays compute only
    # on a slower link the link is the longer: a crossing takes the link time, the copies hide in it
    slow = dataclasses.replace(dag, bandwidth_bytes_per_s=b / (3 * copy))
    assert simulate(build_programs(slow, gpipe(slow)), slow).makespan == pytest.approx(compute + 4 * (1e-3 + 3 * copy), rel=1e-12)


def test_a_busy_receiver_pays_its_copy_in_compute():
    """A message that arrives while its receiver computes is copied in by the receiver's
    CPU all the same: the receiver starts its consumer one copy after it is free."""
    copy = 0.02
    dag = dataclasses.replace(_chain(2), copy_cost=CopyCost(copy))
    dag = dataclasses.replace(dag, cost={g: 1.0 if g == (0, "F") else 10.0 if g == (1, "F") else t for g, t in dag.cost.items()})
    res = simulate(build_programs(dag, gpipe(dag)), dag)
    f1 = {t.mb: (t0, t1) for r, t0, t1, t in res.timeline if (t.chunk, t.phase) == (1, "F")}
    # micro-batch 0: rank 1 waits; the crossing costs latency + one copy after chunk 0's F
    assert f1[0][0] == pytest.approx(1.0 + 1e-3 + copy, rel=1e-12)
    # micro-batch 1 arrived (at ~2 s) while rank 1 computed micro-batch 0 (until ~11 s)
    assert f1[1][0] == pytest.approx(f1[0][1] + copy, rel=1e-12)
    assert evaluate_orders(dag, gpipe(dag)) == pytest.approx(res.makespan, rel=1e-12)  # the search's model agrees


def test_free_copies_change_nothing():
    dag = _chain(4)
    programs = make_programs(dag, "wavek")
    plain = simulate(programs, dag)
    charged = simulate(programs, dataclasses.replace(dag, copy_cost=CopyCost()))
    assert plain.makespan == charged.makespan and not charged.copies


@pytest.mark.parametrize("schedule", [gpipe, one_f_one_b, wavek])
def test_copies_make_every_schedule_slower_by_at_most_their_total(schedule):
    """Copies are serial CPU time: a rank's step grows by at most what it copies."""
    if schedule is one_f_one_b:
        base = dataclasses.replace(
            PipelineDAG.synthetic(2, 1, 4, phase_cost=PHASES, layout="unfolded", boundary_bytes=1e6, bandwidth_bytes_per_s=1e9),
        )
    else:
        base = _chain(4)
    charged = dataclasses.replace(base, copy_cost=CopyCost(0.01, 0.002, 1e-9))
    orders = schedule(base)
    before = simulate(build_programs(base, orders), base)
    after = simulate(build_programs(charged, orders), charged)
    copied = [0.0, 0.0]
    for r, t0, t1, _ in after.copies:
        copied[r] += t1 - t0
    assert after.makespan > before.makespan
    assert after.makespan <= before.makespan + sum(copied) + 1e-12
    # the search model agrees with the simulator within the FIFO detail it skips
    assert evaluate_orders(charged, orders) == pytest.approx(after.makespan, rel=0.05)


def test_more_messages_cost_more():
    """K = 2 crosses ranks twice as often as K = 1: with the same total compute and a per
    message cost, its simulated step grows by more."""
    def step(k: int, per_message: float) -> float:
        dag = PipelineDAG.synthetic(2, k, 8, phase_cost=PHASES, boundary_bytes=1e6, stash_bytes=5e5, bandwidth_bytes_per_s=1e9)
        dag = dataclasses.replace(dag, copy_cost=CopyCost(per_message))
        return simulate(make_programs(dag, "wavek"), dag).makespan

    grow = {k: step(k, 0.05) - step(k, 0.0) for k in (1, 2)}
    assert grow[2] > grow[1] > 0


def test_copy_costs_survive_the_program_meta():
    dag = _chain(2, 3e-5, 2e-10, per_tensor=4e-6)
    back = PipelineDAG.from_description(dag.describe())
    assert back.copy_cost == CopyCost(3e-5, 4e-6, 2e-10)
    measured = dataclasses.replace(dag, copy_cost=_grid())
    assert PipelineDAG.from_description(measured.describe()).copy_cost == _grid()
    # programs stored before the measured model carry the three linear terms
    old = {k: v for k, v in dag.describe().items() if k != "copy_cost"}
    old.update(copy_s_per_message=3e-5, copy_s_per_tensor=4e-6, copy_s_per_byte=2e-10)
    assert PipelineDAG.from_description(old).copy_cost == CopyCost(3e-5, 4e-6, 2e-10)


def test_a_message_of_many_tensors_pays_one_message_and_each_tensor():
    dag = dataclasses.replace(_chain(1), nbytes={"a": 100.0, "b": 300.0}, copy_cost=CopyCost(1.0, 0.1, 0.01))
    assert dag.copy_time(("a", "b")) == pytest.approx(1.0 + 2 * 0.1 + 400 * 0.01)
    assert dag.copy_time(()) == 0.0


def test_negative_copy_costs_are_refused():
    with pytest.raises(ValueError, match="copy costs must be >= 0"):
        _chain(1, -1.0)
    with pytest.raises(ValueError, match="copy costs must be >= 0"):
        _chain(1, per_tensor=-1.0)
    with pytest.raises(ValueError, match="copy costs must be >= 0"):
        CopyCost(per_byte_s=-1e-9)


def _grid() -> MeasuredCopyCost:
    # seconds per message at 1 and 8 tensors × 1 kB, 1 MB and 9 MB
    return MeasuredCopyCost((1, 8), (1e3, 1e6, 9e6), ((1e-4, 3e-4, 2.3e-3), (5e-4, 6e-4, 2.6e-3)))


def test_measured_copy_cost_interpolates_between_and_extrapolates_beyond_its_grid():
    g = _grid()
    for i, n in enumerate(g.tensors):  # exact on the grid
        for j, b in enumerate(g.nbytes):
            assert g.of(n, b) == pytest.approx(g.seconds[i][j], rel=1e-12)
    assert g.of(1, 5e6) == pytest.approx(1.3e-3)  # linear in bytes between two sizes
    assert g.of(4, 1e6) == pytest.approx(3e-4 + (3 / 7) * 3e-4)  # and in tensors between two counts
    assert g.of(1, 10) == g.of(1, 1e3) == pytest.approx(1e-4)  # below the smallest: a message's fixed cost
    assert g.of(1, 17e6) == pytest.approx(2.3e-3 + 8e6 * 2e-3 / 8e6)  # beyond: the last slope per byte
    assert g.of(15, 1e6) == pytest.approx(6e-4 + 7 * (3e-4 / 7))  # beyond in tensors: the last slope per tensor
    assert g.of(0, 1e6) == 0.0 and not g.free
    assert MeasuredCopyCost((1,), (0.0,), ((0.0,),)).free
    assert "message shapes" in g.describe() and "GB/s" in g.describe()
    assert copy_cost_from_json(g.to_json()) == g
    assert copy_cost_from_json(CopyCost(1e-4, 2e-6, 1e-9).to_json()) == CopyCost(1e-4, 2e-6, 1e-9)


def test_measured_copy_cost_is_made_non_decreasing_in_bytes_and_checked():
    noisy = MeasuredCopyCost((1,), (1e3, 1e6, 9e6), ((4e-4, 3e-4, 2e-3),))
    assert noisy.seconds == ((4e-4, 4e-4, 2e-3),)
    with pytest.raises(ValueError, match="increasing tensor counts"):
        MeasuredCopyCost((8, 1), (1e3,), ((1e-4,), (1e-4,)))
    with pytest.raises(ValueError, match="2 rows of 1 seconds"):
        MeasuredCopyCost((1, 8), (1e3,), ((1e-4,),))
    with pytest.raises(ValueError, match="copy costs must be >= 0"):
        MeasuredCopyCost((1,), (1e3,), ((-1e-4,),))
    with pytest.raises(ValueError, match="unknown copy-cost kind"):
        copy_cost_from_json({"kind": "guess"})


def test_a_measured_copy_cost_is_charged_per_message_in_the_simulation():
    """The simulator charges what the grid says for each message's tensors and bytes."""
    dag = dataclasses.replace(_chain(1), copy_cost=_grid())
    programs = build_programs(dag, gpipe(dag))
    res = simulate(programs, dag)
    assert len(res.copies) == 8
    assert all(t1 - t0 == pytest.approx(_grid().of(1, 1e6)) for _, t0, t1, _ in res.copies)


def test_copy_cost_option():
    assert JanusOptions(copy_cost=(50, 5, 4)).resolved_copy_cost() == CopyCost(50 / 1e6, 5 / 1e6, 1 / 4e9)
    assert JanusOptions(copy_cost=None, stages=2).resolved_copy_cost().free
    # nothing measured where gloo does not copy on the ranks' cores, or calibration is off
    assert JanusOptions(device="cuda", stages=2).resolved_copy_cost().free
    assert JanusOptions(calibrate=False, stages=2).resolved_copy_cost().free
    assert JanusOptions(stages=1).resolved_copy_cost().free
    for bad in ("fast", (50, 3), (50, 5, 0), (-1, 5, 3), (50, -5, 3), (True, 5, 3), 7):
        with pytest.raises(OptionsError, match="option 'copy_cost' must be 'auto'"):
            JanusOptions.from_mapping({"copy_cost": bad})


def test_probe_measures_a_cost_on_busy_cpu_ranks(tmp_path, monkeypatch):
    """Two real gloo processes (a 2 × 2 grid, to keep it short; the default grid is the
    same code on 3 × 4 shapes): a 4 MiB message each way per compute unit takes more CPU
    from the ranks than a 64 KiB one, at a rate within physical reason. The result is
    kept for the process and on disk, and read back from disk without a new probe."""
    from janus_compile.runtime import copy_probe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(copy_probe, "_CACHE", {})
    grid = dict(tensors=(1, 4), nbytes=(1 << 16, 1 << 22))
    cost = measure_copy_cost(**grid)
    assert cost.tensors == (1, 4) and cost.nbytes == (1 << 16, 1 << 22)
    small, large = cost.of(1, 1 << 16), cost.of(1, 1 << 22)
    assert 0 <= small < large < 1.0  # a 64 KiB message can be lost in the timing noise; 4 MiB cannot
    assert 0.05 < (1 << 22) / large / 1e9 < 200  # GB/s a core can copy through loopback TCP
    assert measure_copy_cost(**grid) is cost  # measured once per process
    assert copy_probe.copy_cost_cache_path() == tmp_path / "januspipe" / "copy_cost.json"
    assert copy_probe.copy_cost_cache_path().exists()

    def no_probe(*args, **kw):
        raise AssertionError("the probe ran although a fresh measurement was on disk")

    monkeypatch.setattr(copy_probe, "_CACHE", {})
    monkeypatch.setattr("janus_compile.runtime.launch.launch_local", no_probe)
    assert measure_copy_cost(**grid) == cost  # another process on this machine: from disk
    # a day later the measurement is stale
    monkeypatch.setattr(copy_probe.time, "time", lambda: 2e10)
    key = ((1, 4), (1 << 16, 1 << 22), copy_probe.PROBE_UNITS, copy_probe.PROBE_REPEATS)
    assert copy_probe._read_disk(key) is None


def test_disk_cache_failures_lose_nothing(tmp_path, monkeypatch):
    """An unwritable or corrupt cache is ignored: the measurement still stands."""
    from janus_compile.runtime import copy_probe

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    key = ((1, 2),)
    copy_probe._write_disk(key, CopyCost(1e-4, 1e-5, 1e-9))  # cannot create the folder: no error
    assert copy_probe._read_disk(key) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    copy_probe.copy_cost_cache_path().parent.mkdir(parents=True)
    copy_probe.copy_cost_cache_path().write_text("{corrupt")
    assert copy_probe._read_disk(key) is None
    copy_probe._write_disk(key, CopyCost(1e-4, 1e-5, 1e-9))  # replaces the corrupt file
    assert copy_probe._read_disk(key) == CopyCost(1e-4, 1e-5, 1e-9)
    # another machine with the same host name and home directory (containers): not reused
    monkeypatch.setattr(copy_probe, "_boot_id", lambda: "another-boot")
    assert copy_probe._read_disk(key) is None


def test_gantt_shows_the_copies():
    dag = _chain(2, 0.05, 0.0)
    svg = gantt_svg(simulate(make_programs(dag, "wavek"), dag))
    assert "message copy" in svg and svg.count("<title>copy ") == 8 * 2


def test_trainer_charges_the_copy_cost_it_is_given():
    """The option reaches the trainer's DAG, its simulated step and the programs' meta;
    the partition does not depend on it."""
    import torch
    from conftest import random_batch

    from janus_compile.models import build_model
    from janus_compile.pipeline import PipelineTrainer

    def model():
        torch.manual_seed(0)
        return build_model("schnet", hidden=8, num_interactions=4, num_rbf=6, cutoff=3.5).double().train()

    batch = random_batch(5, 4)
    free = PipelineTrainer(model(), batch, stages=2, microbatches=2, copy_cost=None, calibrate=False)
    dear = PipelineTrainer(model(), batch, stages=2, microbatches=2, copy_cost=(1e5, 0, 1e3), calibrate=False)
    assert free.partition.chunk_of_unit == dear.partition.chunk_of_unit
    charged = dear.dag.copy_cost
    assert (charged.per_message_s, charged.per_tensor_s, charged.per_byte_s) == (pytest.approx(0.1), 0.0, pytest.approx(1e-12))
    assert free.dag.copy_cost.free
    messages = sum(len(a.tensors) for p in dear.programs.programs for a in p.actions if type(a).__name__ in ("Send", "Recv"))
    gap = dear.programs.meta["simulated"]["makespan_s"] - free.programs.meta["simulated"]["makespan_s"]
    assert 0.1 < gap <= messages * 0.1 + 1.0  # some message on the critical path, at most all of them
    assert dear.programs.meta["copy_cost"]["per_message_s"] == pytest.approx(0.1)
