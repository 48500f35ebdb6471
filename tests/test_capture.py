"""Capture + joint graph vs eager PyTorch: E, F, stress and every parameter gradient.

float64 at 1e-10 relative, float32 at 1e-5, on random batches of varying size
(hypothesis), for every reference model and for a model with tanh/sigmoid/exp/softmax
on the weight path (the ops whose saved outputs autograd detaches under make_fx).
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close, random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import janus_compile
from janus_compile import EnergyForceLoss
from janus_compile.models import ConservativeModel, build_model, edge_vectors
from janus_compile.passes import tracing
from janus_compile.passes.labels import (
    FORWARD_NODE,
    PHASE,
    PHASES,
    check_labels,
    compute_nodes,
    forward_root,
    phase_counts,
)

LOSS = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)


class GatedToy(ConservativeModel):
    """Small conservative model with tanh, sigmoid, exp and softmax between weights."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__(cutoff=3.5)
        self.embed = nn.Embedding(40, hidden)
        self.radial = nn.Linear(1, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def energy(self, positions, cell, batch):
        r = edge_vectors(positions, cell, batch)
        d = torch.sqrt((r**2).sum(-1, keepdim=True))
        w = torch.tanh(self.radial(d)) * torch.exp(-d)
        h = self.embed(batch.numbers)
        msg = torch.softmax(self.mix(h)[batch.edge_index[1]], dim=-1) * w
        agg = torch.zeros_like(h).index_add(0, batch.edge_index[0], msg)
        e = self.out(torch.sigmoid(agg) * h).squeeze(-1)
        return torch.zeros_like(batch.cell[:, 0, 0]).index_add(0, batch.batch, e)


def make_model(name: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    if name == "gated":
        model = GatedToy()
    elif name == "nequip":
        model = build_model("nequip", hidden_irreps="8x0e + 4x1o", lmax=1, num_interactions=2, cutoff=3.5)
    else:
        model = build_model(name, hidden=8, num_interactions=2, num_rbf=6, cutoff=3.5)
    return model.to(dtype).train()


MODELS = ["gated", "schnet", "painn", "nequip"]
_compiled_cache: dict = {}


def compiled_pair(name: str, dtype=torch.float64):
    """One eager model and its compiled twin per (model, dtype), reused across examples."""
    key = (name, dtype)
    if key not in _compiled_cache:
        model = make_model(name, dtype)
        _compiled_cache[key] = (model, janus_compile.compile(model, loss=LOSS))
    return _compiled_cache[key]


def eager_reference(model, batch):
    params = [p for p in model.parameters()]
    out = model(batch)
    loss = LOSS(out, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out, loss, dict(zip([n for n, _ in model.named_parameters()], grads))


def check_against_eager(name: str, batch, dtype=torch.float64, rel: float = 1e-10):
    model, compiled = compiled_pair(name, dtype)
    ref_out, ref_loss, ref_grads = eager_reference(model, batch)

    # 1. compiled forward through the explicit force graph, loss.backward() through it
    out = compiled(batch)
    for key in ("energy", "forces", "stress"):
        assert_rel_close(out[key].detach(), ref_out[key].detach(), rel, f"{name} {key}")
    params = list(model.parameters())
    grads = torch.autograd.grad(LOSS(out, batch), params, allow_unused=True)
    for (pname, _), g in zip(model.named_parameters(), grads):
        g = torch.zeros_like(ref_grads[pname]) if g is None else g
        assert_rel_close(g, ref_grads[pname], rel, f"{name} double-backward grad {pname}")

    # 2. the joint graph: the whole training step as one first-order graph
    model.zero_grad(set_to_none=True)
    loss, outputs = compiled.train_step(batch)
    assert_rel_close(loss, ref_loss.detach(), rel, f"{name} loss")
    for key in ("energy", "forces", "stress"):
        assert_rel_close(outputs[key], ref_out[key].detach(), rel, f"{name} joint {key}")
    for pname, p in model.named_parameters():
        assert_rel_close(p.grad, ref_grads[pname], rel, f"{name} joint grad {pname}")
    model.zero_grad(set_to_none=True)


batch_params = st.tuples(st.integers(0, 10_000), st.integers(2, 4), st.integers(3, 8))


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_params)
def test_float64_matches_eager(name, params):
    seed, n_structures, max_atoms = params
    batch = random_batch(seed, n_structures, atoms_range=(2, max_atoms))
    check_against_eager(name, batch)


@pytest.mark.parametrize("name", [m if m != "nequip" else pytest.param(m, marks=pytest.mark.slow) for m in MODELS])
def test_float32_matches_eager(name):
    batch = random_batch(7, 3, dtype=torch.float32)
    check_against_eager(name, batch, dtype=torch.float32, rel=1e-5)


def test_one_capture_serves_many_sizes():
    model, compiled = compiled_pair("schnet")
    for seed in range(4):
        check_against_eager("schnet", random_batch(100 + seed, 2 + seed % 3))
    assert len(compiled._force_graphs) == 1 and len(compiled._joint_graphs) == 1


def test_single_structure_batches_recapture_not_misrun():
    """A trace valid only for S >= 2 must not run on S == 1 (or vice versa)."""
    model = make_model("schnet")
    compiled = janus_compile.compile(model, loss=LOSS)
    check_pair = lambda b: assert_rel_close(compiled(b)["forces"].detach(), model(b)["forces"].detach(), 1e-10, "forces")
    check_pair(random_batch(1, 1))
    check_pair(random_batch(2, 3))
    graphs = compiled._force_graphs
    sizes = [{"atoms": 5, "edges": 40, "structures": 1}, {"atoms": 9, "edges": 90, "structures": 3}]
    for s in sizes:
        assert sum(not g.guards.violated(s) for g in graphs) >= 1


def test_autograd_detaches_are_what_makes_it_exact(monkeypatch):
    """Without removing autograd's detaches, parameter gradients differ from eager."""
    monkeypatch.setattr(tracing, "remove_autograd_detaches", lambda gm: 0)
    from janus_compile.passes import capture as capture_mod

    monkeypatch.setattr(capture_mod, "remove_autograd_detaches", lambda gm: 0)
    model = make_model("gated")
    compiled = janus_compile.compile(model, loss=LOSS)
    batch = random_batch(3, 3)
    _, _, ref_grads = eager_reference(model, batch)
    out = compiled(batch)
    grads = torch.autograd.grad(LOSS(out, batch), list(model.parameters()), allow_unused=True)
    worst = max(
        ((g if g is not None else torch.zeros_like(r)) - r).abs().max().item() / r.abs().max().item()
        for g, r in zip(grads, ref_grads.values())
    )
    assert worst > 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_label_invariants(name):
    model, compiled = compiled_pair(name)
    batch = random_batch(11, 2)
    fg = compiled.force_graph(batch)
    jg = compiled.joint_graph(batch)
    check_labels(fg.gm.graph)
    check_labels(jg.gm.graph)
    counts = phase_counts(jg.gm.graph)
    assert all(counts[p] > 0 for p in PHASES), counts
    assert set(phase_counts(fg.gm.graph)) == set(PHASES) and phase_counts(fg.gm.graph)["GG"] == 0
    by_name = {n.name: n for n in jg.gm.graph.nodes}
    for node in compute_nodes(jg.gm.graph):
        assert node.meta[PHASE] in PHASES
        if node.meta[PHASE] != "F" and node.meta.get(FORWARD_NODE):
            assert node.meta[FORWARD_NODE] in by_name
            assert forward_root(jg.gm.graph, node) is not None, f"{node.name} does not fold onto an F node"
    # Every gather's backward is a scatter-add (passes/index_add.py), in both graphs.
    for gm in (fg.gm, jg.gm):
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert torch.ops.aten.index_put.default not in targets and torch.ops.aten.index_add.default in targets
    # Parameters and buffers are graph inputs, never constants.
    placeholders = {n.name for n in jg.gm.graph.nodes if n.op == "placeholder"}
    for pname, _ in model.named_parameters():
        assert "param_" + pname.replace(".", "_") in placeholders


def test_backward_nodes_sit_in_their_forward_module():
    """Most G/GG/FB nodes of an interaction block fold onto that block (not the root)."""
    model, compiled = compiled_pair("schnet")
    jg = compiled.joint_graph(random_batch(12, 2))
    modules = {n.meta["module"] for n in compute_nodes(jg.gm.graph) if n.meta[PHASE] in ("G", "GG", "FB")}
    assert any(m.startswith("interactions.0") for m in modules)
    assert any(m.startswith("interactions.1") for m in modules)


def test_microbatch_losses_and_gradients_add_up_to_the_whole_batch():
    """Gradient accumulation is exact: each micro-batch's loss is normalised by full-batch counts."""
    from janus_compile.data import split_microbatches

    model, compiled = compiled_pair("schnet")
    batch = random_batch(21, 5)
    _, ref_loss, ref_grads = eager_reference(model, batch)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in split_microbatches(batch, 3):
        loss, _ = compiled.train_step(mb)  # accumulates into .grad
        total = total + loss
    assert_rel_close(total, ref_loss.detach(), 1e-10, "summed micro-batch loss")
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, ref_grads[name], 1e-10, f"accumulated grad {name}")
    model.zero_grad(set_to_none=True)
