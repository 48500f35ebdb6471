"""Bad input gets an error that names the cause and the fix."""
from __future__ import annotations

import pytest
import torch
from conftest import random_batch
from torch import nn
from torch.autograd.function import once_differentiable

import janus_compile
from janus_compile import (
    BatchError,
    DataDependentControlFlowError,
    EnergyForceLoss,
    NoDoubleBackwardError,
    NotConservativeError,
    OptionsError,
    ScriptedModuleError,
)
from janus_compile.models import ConservativeModel, build_model, edge_vectors


class _Base(ConservativeModel):
    def __init__(self) -> None:
        super().__init__(cutoff=3.5)
        self.lin = nn.Linear(1, 4)
        self.out = nn.Linear(4, 1)

    def pool(self, e_edge, batch):
        e_atom = torch.zeros_like(batch.positions[:, 0]).index_add(0, batch.edge_index[0], e_edge)
        return torch.zeros_like(batch.cell[:, 0, 0]).index_add(0, batch.batch, e_atom)

    def distances(self, positions, cell, batch):
        r = edge_vectors(positions, cell, batch)
        return torch.sqrt((r**2).sum(-1, keepdim=True))


class PositionFree(ConservativeModel):
    """Energy from atomic numbers only: forces cannot be -dE/dR."""

    def __init__(self) -> None:
        super().__init__(cutoff=3.5, compute_stress=False)
        self.embed = nn.Embedding(40, 1)

    def energy(self, positions, cell, batch):
        e = self.embed(batch.numbers).squeeze(-1)
        return torch.zeros_like(batch.cell[:, 0, 0]).index_add(0, batch.batch, e)


class DataDependent(_Base):
    def energy(self, positions, cell, batch):
        d = self.distances(positions, cell, batch)
        if (d > 3.0).any():  # Python branch on tensor values
            d = d * 2
        return self.pool(self.out(torch.tanh(self.lin(d))).squeeze(-1), batch)


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OnceDifferentiable(_Base):
    def energy(self, positions, cell, batch):
        d = _Square.apply(self.distances(positions, cell, batch))
        return self.pool(self.out(torch.tanh(self.lin(d))).squeeze(-1), batch)


class CdistModel(ConservativeModel):
    """torch.cdist's backward has no derivative formula: no force training possible."""

    def __init__(self) -> None:
        super().__init__(cutoff=3.5, compute_stress=False)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def energy(self, positions, cell, batch):
        d = torch.cdist(positions, positions)
        e = torch.exp(-self.scale * d).sum(-1)
        return torch.zeros_like(batch.cell[:, 0, 0]).index_add(0, batch.batch, e)


def test_position_free_energy_is_not_conservative():
    with pytest.raises(NotConservativeError, match="positions"):
        janus_compile.compile(PositionFree().double(), random_batch(0, 2))


def test_data_dependent_control_flow():
    with pytest.raises(DataDependentControlFlowError, match=r"test_errors.py:\d+.*torch.where"):
        janus_compile.compile(DataDependent().double(), random_batch(0, 2))


def test_once_differentiable_backward_is_refused():
    with pytest.raises(NoDoubleBackwardError, match="once_differentiable"):
        janus_compile.compile(OnceDifferentiable().double().train(), random_batch(0, 2))
    # Eager PyTorch agrees that this model cannot be trained on forces.
    model, batch = OnceDifferentiable().double().train(), random_batch(0, 2)
    with pytest.raises(RuntimeError):
        (model(batch)["forces"] ** 2).sum().backward()


def test_op_without_double_backward_formula():
    with pytest.raises(NoDoubleBackwardError, match="derivative"):
        janus_compile.compile(CdistModel().double().train(), random_batch(0, 2))


def test_missing_batch_field_names_it_and_the_fix():
    batch = random_batch(0, 2).replace(edge_index=None)
    model = build_model("schnet", hidden=8, num_interactions=1, cutoff=3.5).double()
    with pytest.raises(BatchError, match=r"edge_index.*atoms_to_batch"):
        janus_compile.compile(model, batch)


def test_missing_target_for_loss_names_it():
    batch = random_batch(0, 2).replace(forces=None)
    model = build_model("schnet", hidden=8, num_interactions=1, cutoff=3.5).double()
    compiled = janus_compile.compile(model, loss=EnergyForceLoss(force_weight=1.0))
    with pytest.raises(BatchError, match=r"forces.*weight"):
        compiled.train_step(batch)


def test_scripted_submodule_is_refused_with_the_fix():
    model = build_model("schnet", hidden=8, num_interactions=1, cutoff=3.5).double()
    model.embedding = torch.jit.script(model.embedding)
    with pytest.raises(ScriptedModuleError, match="jit_script_fx=False"):
        janus_compile.compile(model, random_batch(0, 2))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"stagez": 2}, "unknown"),
        ({"stages": 0}, "positive"),
        ({"schedule": "x"}, "wavek"),
        ({"memory_cap_gb": "lots"}, "positive number .* 'auto' .* or None"),
        ({"memory_cap_gb": -1.0}, "memory_cap_gb"),
        ({"memory_cap_gb": True}, "memory_cap_gb"),
        ({"link_gb_s": 0}, "link_gb_s.*positive number .* 'auto' .*25 on cpu, 25 on cuda"),
        ({"link_gb_s": "fast"}, "link_gb_s"),
        ({"link_gb_s": False}, "link_gb_s"),
        ({"chunks": "Auto"}, "chunks' must be a positive integer .*'auto', in lower case"),
        ({"stages": True}, "stages' must be a positive integer"),
        ({"calibrate": "no"}, "'calibrate' must be True or False"),
        ({"ilp_time_limit_s": "30"}, "'ilp_time_limit_s' must be a number of seconds, got '30'"),
    ],
)
def test_bad_options(options, match):
    model = build_model("schnet", hidden=8, num_interactions=1, cutoff=3.5).double()
    with pytest.raises(OptionsError, match=match):
        janus_compile.compile(model, **options)


@pytest.mark.parametrize("options", [{"stages": 2}, {"graph_parallel": 2}, {"data_parallel": 2}])
def test_torch_compile_path_refuses_distributed_options_with_the_alternative(options):
    torch._dynamo.reset()
    model = build_model("schnet", hidden=8, num_interactions=1, cutoff=3.5).double()
    compiled = torch.compile(model, backend="januspipe", options=options)
    with pytest.raises(Exception, match="PipelineTrainer"):
        compiled(random_batch(0, 2))


def test_step_bench_reports_a_failed_variant_and_runs_the_next(caplog):
    """A variant whose process gives no result is a row with its error, not an exception
    that loses the rows measured so far; the next variant still runs."""
    from janus_compile.step_bench import StepBenchConfig, markdown, run_step_bench

    cfg = StepBenchConfig(models=["schnet"], hidden=8, layers=1, atoms=40, variants=["eager", "joint"], timeout_s=0.2)
    with caplog.at_level("ERROR"):
        rows = run_step_bench(cfg, progress=False)
    assert [(r["variant"], r.get("error")) for r in rows] == [
        ("eager", "step-bench: schnet eager gave no result within 0.2 s"),
        ("joint", "step-bench: schnet joint gave no result within 0.2 s"),
    ]
    assert "| schnet | joint | failed: step-bench: schnet joint gave no result" in markdown(rows, cfg)
    assert "schnet eager gave no result" in caplog.text
