"""The graph-parallel pass: where it sums, what it refuses, and that sharding is real."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close, random_batch
from torch import nn

import janus_compile
from janus_compile import EnergyForceLoss
from janus_compile.data.collate import edge_shard
from janus_compile.models import ConservativeModel, build_model, edge_vectors
from janus_compile.passes.gp import GraphParallelError, shard_edges
from janus_compile.passes.labels import PHASES, check_labels
from janus_compile.runtime.collectives import GP_ALL_REDUCE

LOSS = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)


class _Pairwise(ConservativeModel):
    """A small pair model whose per-atom reduction of edges is chosen by the subclass."""

    def __init__(self) -> None:
        super().__init__(cutoff=3.5)
        self.embed = nn.Embedding(40, 4)
        self.lin = nn.Linear(1, 4)
        self.out = nn.Linear(4, 1)

    def edge_features(self, positions, cell, batch):
        r = edge_vectors(positions, cell, batch)
        return torch.tanh(self.lin(torch.sqrt((r**2).sum(-1, keepdim=True))))

    def reduce(self, x, msg, batch):
        return x.index_add(0, batch.edge_index[0], msg)  # residual: the destination is not zeros

    def energy(self, positions, cell, batch):
        x = self.embed(batch.numbers)
        h = self.reduce(x, self.edge_features(positions, cell, batch) * x[batch.edge_index[1]], batch)
        e_atom = self.out(torch.tanh(h)).squeeze(-1)
        return torch.zeros_like(cell[:, 0, 0]).index_add(0, batch.batch, e_atom)


class _MaxOverEdges(_Pairwise):
    def reduce(self, x, msg, batch):
        index = batch.edge_index[0].unsqueeze(-1).expand_as(msg)
        return x + torch.zeros_like(x).scatter_reduce(0, index, msg, reduce="amax", include_self=False)


class _MeanByEdgeCount(_Pairwise):
    def reduce(self, x, msg, batch):
        return x + torch.zeros_like(x).index_add(0, batch.edge_index[0], msg) / batch.edge_index.shape[1]


def _joint(model, batch):
    return janus_compile.compile(model, batch, loss=LOSS).joint_graph(batch)


def _run(joint, model, batch):
    return joint.gm(*joint.flat_inputs(dict(model.named_parameters()), dict(model.named_buffers()), batch))


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_sums_in_all_four_phases_and_exact_without_group(name):
    torch.manual_seed(0)
    model = build_model(name, hidden=8, num_interactions=2, num_rbf=6, cutoff=3.5).double()
    batch = random_batch(1, 3)
    joint = _joint(model, batch)
    before = _run(joint, model, batch)
    report = shard_edges(joint.gm)
    check_labels(joint.gm.graph)
    assert all(report.all_reduces[p] > 0 for p in PHASES), report.all_reduces
    inserted = [n for n in joint.gm.graph.nodes if n.target is GP_ALL_REDUCE]
    assert len(inserted) == sum(report.all_reduces.values())
    assert all(n.meta.get("phase") in PHASES for n in inserted)
    # with no gp group the inserted sums are identities: one process still gets eager's numbers
    for a, e in zip(_run(joint, model, batch), before):
        assert_rel_close(a, e, 1e-12, "unsharded run of the gp graph")
    # on one shard alone the numbers are wrong: the all-reduces are what make gp exact
    shard = _run(joint, model, edge_shard(batch, 0, 2))
    assert (shard[1] - before[1]).abs().max() > 1e-3 * before[1].abs().max()


def test_residual_accumulation_is_rewritten_so_the_destination_counts_once():
    torch.manual_seed(0)
    model = _Pairwise().double()
    batch = random_batch(2, 2)
    joint = _joint(model, batch)
    before = _run(joint, model, batch)
    report = shard_edges(joint.gm)
    assert report.rewritten_accumulations >= 1
    for a, e in zip(_run(joint, model, batch), before):
        assert_rel_close(a, e, 1e-12, "rewritten graph")


@pytest.mark.distributed
def test_residual_accumulation_exact_on_two_ranks():
    from janus_compile.pipeline import PipelineTrainer

    torch.manual_seed(0)
    model = _Pairwise().double()
    batch = random_batch(3, 2)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=1, microbatches=1, graph_parallel=2, calibrate=False, timeout_s=120)
    out = trainer.gradients(batch)
    ref = model(batch)
    loss = LOSS(ref, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_rel_close(torch.tensor(out.loss, dtype=torch.float64), loss.detach(), 1e-10, "loss")
    assert_rel_close(out.outputs["forces"], ref["forces"].detach(), 1e-10, "forces")
    for (name, _), g in zip(model.named_parameters(), grads):
        assert_rel_close(out.grads[name], g, 1e-10, name)


def test_max_over_edges_is_refused_with_the_op_named():
    model = _MaxOverEdges().double()
    batch = random_batch(4, 2)
    joint = _joint(model, batch)
    with pytest.raises(GraphParallelError, match="scatter_reduce.*not a sum"):
        shard_edges(joint.gm)


def test_normalising_by_the_edge_count_is_refused():
    model = _MeanByEdgeCount().double()
    batch = random_batch(5, 2)
    joint = _joint(model, batch)
    with pytest.raises(GraphParallelError, match="number of edges"):
        shard_edges(joint.gm)


def test_graph_parallel_option_dumps_the_report(tmp_path):
    torch.manual_seed(0)
    model = build_model("schnet", hidden=8, num_interactions=1, num_rbf=6, cutoff=3.5).double()
    batch = random_batch(6, 2)
    compiled = janus_compile.compile(model, batch, loss=LOSS, graph_parallel=2, dump_dir=str(tmp_path), calibrate=False)
    text = (tmp_path / "graph_parallel.md").read_text()
    assert "gp = 2" in text and "| GG |" in text
    # train_step in one process runs the gp graph unsharded and matches eager
    loss, _ = compiled.train_step(batch)
    ref = LOSS(model(batch), batch)
    assert_rel_close(loss.detach(), ref.detach(), 1e-12, "loss")


class _ReverseEdgeLookup(_Pairwise):
    """Reads every edge's reverse edge (DimeNet-style): not local to an edge shard."""

    def edge_features(self, positions, cell, batch):
        f = super().edge_features(positions, cell, batch)
        reverse = (f.shape[0] - 1) - torch.arange(f.shape[0], device=f.device)
        return f + f.index_select(0, reverse)


class _SoftmaxOverEdges(_Pairwise):
    def edge_features(self, positions, cell, batch):
        return torch.softmax(super().edge_features(positions, cell, batch), dim=0)


@pytest.mark.parametrize("model_cls,match", [(_ReverseEdgeLookup, "gathers from a per-edge tensor"), (_SoftmaxOverEdges, "along the edge dimension")])
def test_ops_that_read_other_edges_are_refused(model_cls, match):
    model = model_cls().double()
    batch = random_batch(7, 2)
    joint = _joint(model, batch)
    with pytest.raises(GraphParallelError, match=match):
        shard_edges(joint.gm)
