"""Real multi-process pipeline training (gloo over loopback) against single-process eager."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from conftest import assert_rel_close, eager_adam_losses, random_batch

from janus_compile import EnergyForceLoss
from janus_compile.memory_budget import auto_memory_budget_bytes
from janus_compile.models import build_model
from janus_compile.pipeline import PipelineTrainer
from janus_compile.runtime.launch import WorkerError

pytestmark = pytest.mark.distributed
LOSS = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)


def _model():
    torch.manual_seed(0)
    return build_model("schnet", hidden=8, num_interactions=4, num_rbf=6, cutoff=3.5).double().train()


def _eager(model, batch):
    loss = LOSS(model(batch), batch)
    return loss.detach(), dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def _assert_equals_eager(out, model, batch, what: str) -> None:
    """Loss and every parameter gradient of a pipelined step equal eager's (float64, 1e-10)."""
    ref_loss, ref_grads = _eager(model, batch)
    assert_rel_close(torch.tensor(out.loss, dtype=torch.float64), ref_loss, 1e-10, f"{what} loss")
    for name, g in ref_grads.items():
        assert_rel_close(out.grads[name], g, 1e-10, f"{what} grad {name}")


FAST = [("wavek", 2, 1, 2), ("1f1b", 2, 1, 4), ("hanayo", 2, 2, 2), ("gpipe", 2, 2, 4)]
FULL = [
    (s, p, k, m)
    for s in ("wavek", "gpipe", "1f1b", "hanayo")
    for p in (2, 4)
    for k in (1, 2)
    for m in (p, 2 * p, 4 * p)
    if not (s == "1f1b" and k == 2) and (s, p, k, m) not in FAST
]


@pytest.mark.parametrize("schedule,stages,chunks,microbatches", FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in FULL])
def test_gradients_equal_eager(schedule, stages, chunks, microbatches):
    model = _model()
    batch = random_batch(3, max(4, microbatches))
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=stages, chunks=chunks, microbatches=microbatches, schedule=schedule, calibrate=False)
    out = trainer.gradients(batch)
    _assert_equals_eager(out, model, batch, f"{schedule} P={stages} K={chunks} M={microbatches}")


def test_units_out_of_order_run_exactly_on_real_processes():
    """A data-flow (dag) placement sends values past the next chunk and back down two
    waves; the runtime still gives eager's step."""
    model = _model()
    batch = random_batch(3, 4)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks=2, microbatches=4, schedule="wavek", calibrate=False, unit_order="dag")
    a = trainer.partition.chunk_of_unit
    assert any(a[i] > a[i + 1] for i in range(len(a) - 1)), f"placement {a} is a chain: nothing out of order tested"
    _assert_equals_eager(trainer.gradients(batch), model, batch, "wavek P=2 K=2 dag order")


def test_training_loss_curve_matches_eager():
    """20 Adam steps with WaveK on 2 processes give eager's loss curve."""
    model = _model()
    batches = [random_batch(40 + k, 4) for k in range(4)]
    trainer = PipelineTrainer(model, batches[0], loss=LOSS, stages=2, chunks=1, microbatches=2, schedule="wavek", calibrate=False)
    eager = _model()
    expected = eager_adam_losses(eager, batches, 5, LOSS)
    got = trainer.train(batches, epochs=5, lr=1e-3)
    assert len(got) == 20
    for k, (a, e) in enumerate(zip(got, expected)):
        assert abs(a - e) <= 1e-9 * abs(e), f"step {k}: {a} vs eager {e}"
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert_rel_close(p.detach(), q.detach(), 1e-9, f"trained {n}")


def test_lost_rank_is_named_and_others_exit(monkeypatch):
    model = _model()
    batch = random_batch(3, 4)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks=1, microbatches=2, schedule="gpipe", calibrate=False, timeout_s=120)
    monkeypatch.setenv("JANUSPIPE_FAULT", "1:0:3")  # rank 1 dies at its 4th action of step 0
    start = time.time()
    with pytest.raises(WorkerError) as info:
        trainer.gradients(batch)
    assert time.time() - start < 240  # spawn + detection; the timeout is 120 s per wait
    text = str(info.value)
    assert "rank 1" in text and ("lost rank 1" in text or "without a result" in text), text


def test_resume_after_a_lost_rank_continues_the_same_losses(tmp_path, monkeypatch):
    """Kill a rank in epoch 3; resuming from the epoch-2 checkpoint gives the uninterrupted losses."""
    batches = [random_batch(60 + k, 4) for k in range(2)]
    model = _model()
    trainer = PipelineTrainer(model, batches[0], loss=LOSS, stages=2, microbatches=2, schedule="wavek", calibrate=False, timeout_s=60)
    full = trainer.train(batches, epochs=3, lr=1e-3)

    model = _model()
    trainer = PipelineTrainer(model, batches[0], loss=LOSS, stages=2, microbatches=2, schedule="wavek", calibrate=False, timeout_s=60)
    ckpt = tmp_path / "ckpt.pt"
    monkeypatch.setenv("JANUSPIPE_FAULT", "0:4:2")  # rank 0 dies in step 4 (epoch 3)
    with pytest.raises(WorkerError):
        trainer.train(batches, epochs=3, lr=1e-3, checkpoint=str(ckpt))
    monkeypatch.delenv("JANUSPIPE_FAULT")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # epochs 1 and 2 done
    resumed = trainer.train(batches, epochs=3, lr=1e-3, checkpoint=str(ckpt), resume=True)
    assert len(resumed) == 2
    for a, e in zip(resumed, full[4:]):
        assert abs(a - e) <= 1e-9 * abs(e), (resumed, full[4:])


def _replayed_peak(trainer, batch):
    from janus_compile.compiled import size_values_from_batch
    from janus_compile.data import split_microbatches
    from janus_compile.passes.memory import program_memory

    sizes = [size_values_from_batch(mb) for mb in split_microbatches(batch, trainer.microbatches)]
    return max(m.peak_bytes for m in program_memory(trainer.graphs, trainer.programs, sizes))


def test_memory_cap_lets_wavek_keep_more_in_flight_and_stays_exact():
    """With memory_cap_gb WaveK searches in-flight caps above P and keeps the fastest
    schedule whose replayed peak fits; the programs it picks still train exactly."""
    from janus_compile.passes.symfold_ilp import OPTIMIZER_COPIES

    model = _model()
    batch = random_batch(5, 8)
    kw = dict(loss=LOSS, stages=2, chunks=1, microbatches=8, schedule="wavek", calibrate=False)
    counted = PipelineTrainer(model, batch, memory_cap_gb=None, **kw)
    assert max(counted.programs.meta["simulated"]["peak_in_flight"]) <= 2
    state = OPTIMIZER_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())
    budget = 2.0 * _replayed_peak(counted, batch)
    trainer = PipelineTrainer(model, batch, memory_cap_gb=(budget + state) / 1e9, **kw)
    meta = trainer.programs.meta
    assert max(meta["simulated"]["peak_in_flight"]) > 2  # the memory was used
    assert meta["simulated"]["makespan_s"] <= counted.programs.meta["simulated"]["makespan_s"] * (1 + 1e-9)
    assert _replayed_peak(trainer, batch) <= budget * (1 + 1e-9)
    assert max(meta["wavek_memory_bytes"]) == pytest.approx(_replayed_peak(trainer, batch))
    out = trainer.gradients(batch)
    _assert_equals_eager(out, model, batch, "memory-capped wavek")
    # the default, memory_cap_gb='auto', is a share of this host's memory split between the
    # two ranks: far more than these micro-batches need, so it too holds more than P
    default = PipelineTrainer(model, batch, **kw)
    meta = default.programs.meta
    assert meta["wavek_memory_budget_bytes"] == pytest.approx(auto_memory_budget_bytes("cpu", 2) - state)
    assert max(meta["simulated"]["peak_in_flight"]) > 2 and meta["wavek_memory_fits"] is True
    assert meta["simulated"]["makespan_s"] <= counted.programs.meta["simulated"]["makespan_s"] * (1 + 1e-9)


def test_auto_memory_that_nothing_fits_falls_back_to_p_in_flight(monkeypatch, caplog):
    """'auto' is no promise the user made: where the share of memory is too small for any
    schedule, WaveK warns and keeps P in flight rather than refusing to train."""
    import janus_compile.memory_budget as memory_budget

    model = _model()
    batch = random_batch(5, 4)
    monkeypatch.setattr(memory_budget, "host_memory_bytes", lambda: 10**5)  # 37.5 kB per rank: below the 70 kB optimizer state
    with caplog.at_level("WARNING"):
        trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks=1, microbatches=4, schedule="wavek", calibrate=False)
    assert "WaveK keeps P micro-batches in flight" in caplog.text
    assert "wavek_memory_budget_bytes" not in trainer.programs.meta
    assert max(trainer.programs.meta["simulated"]["peak_in_flight"]) <= 2
    monkeypatch.setattr(memory_budget, "host_memory_bytes", lambda: 6 * 10**5)  # 225 kB per rank: the state fits, no schedule does
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks=1, microbatches=4, schedule="wavek", calibrate=False)
    assert "no schedule fits the memory budget" in caplog.text
    assert trainer.programs.meta["wavek_memory_fits"] is False
    assert max(trainer.programs.meta["simulated"]["peak_in_flight"]) <= 2


@pytest.mark.parametrize(
    "cap_gb,message",
    [
        (1e-7, "memory_cap_bytes = 100 B per rank is too small"),  # below the partition's own lower bound
        (4e-4, "no schedule fits the memory budget of 0.3 MiB per rank; the smallest candidate needs"),  # below any replay
    ],
)
@pytest.mark.parametrize("chunks", [1, "auto"])
def test_memory_cap_below_what_any_schedule_needs_is_refused(cap_gb, message, chunks):
    """With chunks='auto' every K fails the same way, and the error is the one a fixed K gives."""
    model = _model()
    batch = random_batch(5, 4)
    with pytest.raises(Exception, match=message):
        PipelineTrainer(
            model, batch, loss=LOSS, stages=2, chunks=chunks, microbatches=4, schedule="wavek", calibrate=False, memory_cap_gb=cap_gb
        )


def test_chunks_auto_keeps_the_faster_k_and_stays_exact(tmp_path):
    """chunks='auto' partitions and schedules with K = 1, 2 (and 4 where the model has
    units enough) on one calibration and keeps the one the simulator finds fastest (a
    larger K only by more than the margin); the kept plan trains exactly."""
    model = _model()
    batch = random_batch(7, 4)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks="auto", microbatches=4, schedule="wavek", calibrate=False, dump_dir=str(tmp_path))
    tried = trainer.chunks_tried
    assert {1, 2} <= set(tried) <= {1, 2, 4}
    from janus_compile.pipeline import AUTO_CHUNKS_MARGIN

    best = 1
    for k in sorted(tried):
        if tried[k] < tried[best] * (1 - AUTO_CHUNKS_MARGIN):
            best = k
    assert trainer.chunks == best
    assert trainer.partition.chunks == trainer.chunks == trainer.compiled.options.chunks
    assert trainer.programs.meta["simulated"]["makespan_s"] == pytest.approx(tried[trainer.chunks])
    assert trainer.partition.num_chunks == 2 * trainer.chunks
    split = sorted(p.name for p in (tmp_path / "split").glob("chunk*_F.py"))
    assert len(split) == 2 * trainer.chunks, split  # the dump shows the kept partition only
    out = trainer.gradients(batch)
    _assert_equals_eager(out, model, batch, f"chunks=auto (K={trainer.chunks})")


def test_chunks_auto_is_refused_where_k_is_fixed():
    with pytest.raises(ValueError, match="chunks='auto' picks K for the wavek and gpipe schedules"):
        PipelineTrainer(_model(), random_batch(7, 4), loss=LOSS, stages=2, chunks="auto", microbatches=2, schedule="1f1b", calibrate=False)


def test_plan_like_shares_the_graph_and_calibration_where_the_split_differs(monkeypatch):
    """1F1B beside WaveK, another K or another partition option: the later trainer
    captures (to compare) but builds no joint graph and calibrates nothing again, makes
    its own partitions on the shared node times, and trains exactly."""
    import janus_compile.compiled as compiled_mod
    import janus_compile.passes.cost as cost_mod

    model = _model()
    batch = random_batch(8, 8)
    first = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks="auto", microbatches=4, schedule="wavek", rebalance=False)
    assert first.plan_shared is None

    def must_not_run(*args, **kwargs):
        raise AssertionError("built or calibrated again: plan_like should have shared the graph and its node times")

    monkeypatch.setattr(cost_mod, "calibrate", must_not_run)
    monkeypatch.setattr(compiled_mod, "build_joint_graph", must_not_run)
    (node_times,) = first.compiled._node_times.values()
    cases = (dict(schedule="1f1b", chunks=1), dict(chunks=2), dict(replicate="never"), dict(stages=3), dict(memory_cap_gb=1.0), dict(chunks=2, microbatches=2))
    for kwargs in cases:
        args = {**dict(loss=LOSS, stages=2, chunks="auto", microbatches=4, schedule="wavek", rebalance=False), **kwargs}
        again = PipelineTrainer(model, batch, plan_like=first, **args)
        assert again.plan_shared == "graphs", kwargs
        assert again.joint is first.joint and node_times in again.compiled._node_times.values()
        assert not any(again.partition is p for p in first._candidates[0].values())
        if kwargs.get("microbatches") == 2:
            # micro-batches of other sizes: the shared cost model priced at their own sizes
            assert len(again.compiled._node_times) == 2
            assert any(again.partition.node_times[n] != t for n, t in node_times.items())
        else:
            assert all(again.partition.node_times[n] == t for n, t in node_times.items())  # split on the shared times
        _assert_equals_eager(again.gradients(batch), model, batch, f"plan_like sharing graphs {kwargs}")


def test_plan_like_reuses_the_partitions_and_stays_exact(monkeypatch):
    """A trainer for another M (or GPipe beside WaveK) built ``plan_like`` an earlier one
    builds no joint graph and calibrates and partitions nothing again (those are made to
    fail here; only the model's energy+force graph is captured, to compare it), keeps the
    earlier trainer's K's, schedules its own M, and trains exactly; a trainer whose graph
    could differ is refused with the reason."""
    import janus_compile.compiled as compiled_mod
    import janus_compile.passes.symfold as symfold_mod

    model = _model()
    first = PipelineTrainer(model, random_batch(7, 4), loss=LOSS, stages=2, chunks="auto", microbatches=2, schedule="wavek", calibrate=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("planned again: plan_like should have reused the partitions")

    monkeypatch.setattr(symfold_mod, "partition_graph", must_not_run)
    monkeypatch.setattr(compiled_mod, "capture_force_graph", must_not_run)
    monkeypatch.setattr(compiled_mod, "build_joint_graph", must_not_run)
    batch = random_batch(8, 8)  # M = 4 micro-batches of two structures, as the first trainer's
    for schedule in ("wavek", "gpipe"):
        again = PipelineTrainer(model, batch, loss=LOSS, stages=2, chunks="auto", microbatches=4, schedule=schedule, calibrate=False, plan_like=first)
        assert again.plan_shared == "partitions"
        assert set(again.chunks_tried) == set(first.chunks_tried)
        assert any(again.partition is p for p in first._candidates[0].values())
        assert again.partition.chunks == again.chunks == again.compiled.options.chunks
        assert again.microbatches == 4 and len(again.programs.meta["simulated"]["peak_in_flight"]) == 2
        assert first.compiled.options.microbatches == 2  # the first trainer's plan is untouched
        _assert_equals_eager(again.gradients(batch), model, batch, f"{schedule} plan_like (K={again.chunks})")

    narrower = build_model("schnet", hidden=6, num_interactions=4, num_rbf=6, cutoff=3.5).double()
    shorter = build_model("schnet", hidden=8, num_interactions=4, num_rbf=6, cutoff=3.0).double()  # same parameters
    shorter.load_state_dict(model.state_dict())
    unlabelled = dataclasses.replace(batch, stress=None)
    for kwargs, reason in [
        (dict(model=narrower), "the model differs"),
        (dict(model=shorter), "the model differs: its captured graph's code differs"),
        (dict(batch=unlabelled), "the example's labels"),
        (dict(loss=EnergyForceLoss(force_weight=1.0)), "the loss differs"),
        (dict(calibrate=True), "option 'calibrate'"),
    ]:
        args = {**dict(model=model, loss=LOSS, stages=2, chunks="auto", microbatches=4, schedule="wavek", calibrate=False), **kwargs}
        mdl, example = args.pop("model"), args.pop("batch", batch)
        with pytest.raises(ValueError, match=f"plan_like: .*{reason}"):
            PipelineTrainer(mdl, example, plan_like=first, **args)


@pytest.mark.parametrize("device,link", [("cpu", None), ("cuda", 40e9)])
def test_the_ilp_prices_bytes_at_the_link_speed_on_gpus(monkeypatch, device, link):
    """On GPUs the partitioner gets the link speed the schedule is simulated with; on CPU
    ranks it keeps its own (the ranks' copies are charged apart). No GPU is needed: the
    options are read before anything runs on the device."""
    import janus_compile.passes.symfold as symfold_mod
    from janus_compile.compiled import CompiledMLIP
    from janus_compile.options import JanusOptions

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(symfold_mod, "partition_graph", record)
    opts = JanusOptions.from_mapping(dict(stages=2, device=device, link_gb_s=40.0, calibrate=False))
    compiled = CompiledMLIP(_model(), opts, LOSS)
    batch = random_batch(4, 2)
    with pytest.raises(RuntimeError, match="recorded"):
        compiled._solve(compiled.joint_graph(batch), batch, 1, None)
    assert seen.get("bandwidth_bytes_per_s") == link
