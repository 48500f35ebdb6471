"""The explicit training graph through TorchInductor: same loss and gradients as eager.

Stock torch.compile cannot train these models (double backward); the joint graph is
first order, so inductor compiles it. Inductor may reorder floating-point sums, so the
comparison is float64 at 1e-10, the project's bar for exactness.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close, random_batch

import janus_compile
from janus_compile import EnergyForceLoss
from janus_compile.models import build_model
from janus_compile.options import JanusOptions, OptionsError

LOSS = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)


def _model(name: str):
    torch.manual_seed(0)
    return build_model(name, hidden=8, num_interactions=2, num_rbf=6, cutoff=3.5).double().train()


def _eager(model, batch):
    loss = LOSS(model(batch), batch)
    names = [n for n, _ in model.named_parameters()]
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


def _check(model, compiled, batch, what):
    for p in model.parameters():
        p.grad = None
    loss, outputs = compiled.train_step(batch, accumulate=False)
    ref_loss, ref_grads = _eager(model, batch)
    assert_rel_close(loss, ref_loss, 1e-10, f"{what} loss")
    ref_out = model(batch)
    for key in ("energy", "forces", "stress"):
        assert_rel_close(outputs[key], ref_out[key].detach(), 1e-10, f"{what} {key}")
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, ref_grads[name], 1e-10, f"{what} grad {name}")


def test_inductor_train_step_equals_eager_across_batch_sizes():
    """One compiled kernel set (dynamic sizes) serves batches of other atom and edge counts."""
    model = _model("schnet")
    compiled = janus_compile.compile(model, loss=LOSS, inductor=True)
    for seed, n in ((1, 3), (2, 3)):
        _check(model, compiled, random_batch(seed, n), f"schnet inductor batch {seed}")
    assert len(compiled._inductor) == 1  # one compiled graph (same guards), no re-capture


def test_one_structure_batch_on_two_threads_equals_eager():
    """A one-structure batch traces its per-structure sums as scatter-adds into one row;
    inductor's vectorised CPU atomic add fails on those with more than one thread, so
    they are compiled as sums (`compiled._sum_into_single_rows`). Exact, not just running."""
    from janus_compile.compiled import _sum_into_single_rows

    model = _model("schnet")
    batch = random_batch(4, 1)
    compiled = janus_compile.compile(model, batch, loss=LOSS, inductor=True)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(compiled.joint_graph(batch).gm.graph, {}))
    scatters = lambda g: sum(n.target in (torch.ops.aten.index_add.default, torch.ops.aten.index_put.default) for n in g.nodes)
    before = scatters(graph)
    _sum_into_single_rows(graph)
    assert scatters(graph) < before  # the per-structure sums were rewritten
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(model, compiled, batch, "schnet inductor, one structure, 2 threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["painn", "nequip"])
def test_inductor_train_step_equals_eager_other_models(name):
    if name == "nequip":
        torch.manual_seed(0)
        model = build_model("nequip", num_interactions=2, cutoff=3.5).double().train()
    else:
        model = _model(name)
    compiled = janus_compile.compile(model, loss=LOSS, inductor=True)
    _check(model, compiled, random_batch(3, 3), f"{name} inductor")


def test_inductor_option_is_checked():
    with pytest.raises(OptionsError, match="'inductor' must be True or False"):
        JanusOptions.from_mapping({"inductor": "yes"})


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_workers_run_stage_graphs_through_inductor():
    """P = 2 WaveK with every stage graph compiled by inductor in its worker: eager's gradients."""
    from janus_compile.pipeline import PipelineTrainer

    model = _model("schnet")
    batch = random_batch(5, 4)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, microbatches=2, schedule="wavek", calibrate=False, inductor=True)
    assert trainer.inductor
    out = trainer.gradients(batch)
    ref_loss, ref_grads = _eager(model, batch)
    assert_rel_close(torch.tensor(out.loss, dtype=torch.float64), ref_loss, 1e-10, "loss")
    for name, g in ref_grads.items():
        assert_rel_close(out.grads[name], g, 1e-10, f"pipelined inductor grad {name}")


@pytest.mark.slow
def test_step_bench_reports_the_same_numbers_faster_or_not(tmp_path, capsys):
    """`januspipe step-bench` end to end on the CPU: three variants, each in its own process,
    compared with eager (float64: the joint graph is exact, inductor within 1e-10)."""
    import json

    from janus_compile.cli import main

    out = tmp_path / "step.json"
    args = ["step-bench", "--models", "schnet", "--hidden", "8", "--layers", "1", "--atoms", "40", "--dtype", "float64",
            "--steps", "2", "--warmup", "1", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| schnet | joint+inductor |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager", "joint", "joint+inductor"]
    assert rows[1]["max_rel_diff_vs_eager"] <= 1e-10 and rows[2]["max_rel_diff_vs_eager"] <= 1e-10
    assert all(r["step_s_median"] > 0 for r in rows)
