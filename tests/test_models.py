"""Reference models (SchNet, PaiNN): autograd forces/stress vs finite differences,
rotation invariance/equivariance, and the double backward used for force training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from janus_compile.data import AtomsBatch, atoms_to_batch
from janus_compile.models import MODEL_REGISTRY, PaiNN, SchNet, build_model

CUTOFF = 3.5
SMALL = dict(hidden=8, num_interactions=2, num_rbf=6, cutoff=CUTOFF)


def _structures(seed: int = 0) -> list[Atoms]:
    """Two small periodic structures: a 2-atom triclinic-ish diamond primitive cell
    (self-images, non-orthogonal cell) and a rattled, sheared 8-atom rocksalt cell."""
    rng = np.random.default_rng(seed)
    a = bulk("Si", "diamond", a=4.0)
    a.rattle(0.1, seed=seed)
    a.set_atomic_numbers([14, 6])
    b = bulk("NaCl", "rocksalt", a=4.2, cubic=True)
    strain = np.eye(3) + 0.05 * rng.standard_normal((3, 3))
    b.set_cell(b.cell[:] @ strain, scale_atoms=True)
    b.rattle(0.1, seed=seed + 1)
    return [a, b]


def make_batch(structures: list[Atoms], cutoff: float = CUTOFF, dtype=torch.float64) -> AtomsBatch:
    return atoms_to_batch(structures, cutoff, dtype=dtype, labels=False)


def _model(cls, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(**{**SMALL, **kw}).double()


MODELS = [SchNet, PaiNN]


@pytest.fixture(scope="module")
def batch() -> AtomsBatch:
    return make_batch(_structures())


def _energy(model, positions, cell, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.energy(positions, cell, batch)


@pytest.mark.parametrize("cls", MODELS)
def test_forces_match_finite_differences(cls, batch):
    model = _model(cls).eval()
    out = model(batch)
    assert out["energy"].shape == (2,) and out["forces"].shape == batch.positions.shape
    h = 1e-5
    fd = torch.zeros_like(batch.positions)
    for n in range(batch.num_atoms):
        for k in range(3):
            p, m = batch.positions.clone(), batch.positions.clone()
            p[n, k] += h
            m[n, k] -= h
            fd[n, k] = -(_energy(model, p, batch.cell, batch).sum() - _energy(model, m, batch.cell, batch).sum()) / (2 * h)
    assert out["forces"].abs().max() > 1e-4  # not trivially zero
    torch.testing.assert_close(out["forces"], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", MODELS)
def test_stress_matches_strain_finite_differences(cls, batch):
    model = _model(cls).eval()
    stress = model(batch)["stress"]
    volume = torch.linalg.det(batch.cell).abs()
    h = 1e-5
    fd = torch.zeros_like(stress)

    def strained_energy(d: torch.Tensor) -> torch.Tensor:
        eps = 0.5 * (d + d.T)
        positions = batch.positions + batch.positions @ eps
        cell = batch.cell + batch.cell @ eps
        return _energy(model, positions, cell, batch)

    for a in range(3):
        for b in range(3):
            d = torch.zeros(3, 3, dtype=torch.float64)
            d[a, b] = h
            fd[:, a, b] = (strained_energy(d) - strained_energy(-d)) / (2 * h) / volume
    assert stress.abs().max() > 1e-5
    torch.testing.assert_close(stress, fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stress, stress.transpose(-1, -2))


def _random_rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("cls", MODELS)
def test_rotation_invariance_and_equivariance(cls, batch):
    model = _model(cls).eval()
    rot = _random_rotation(3)
    out = model(batch)
    # Rotating positions and cell rows; integer shifts are unchanged.
    rotated = batch.replace(positions=batch.positions @ rot.T, cell=batch.cell @ rot.T)
    out_r = model(rotated)
    torch.testing.assert_close(out_r["energy"], out["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_r["forces"], out["forces"] @ rot.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_r["stress"], rot @ out["stress"] @ rot.T, rtol=1e-9, atol=1e-10)
    # Translation invariance too.
    shifted = batch.replace(positions=batch.positions + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64))
    torch.testing.assert_close(model(shifted)["energy"], out["energy"], rtol=1e-10, atol=1e-10)


def _loss(model, batch) -> torch.Tensor:
    out = model(batch)
    return out["energy"].sum() + (out["forces"] ** 2).sum() + (out["stress"] ** 2).sum()


def _probe_params(cls):
    """A few parameter entries whose gradient needs the second derivative."""
    if cls is SchNet:
        return [
            ("interactions.0.filter_net.0.weight", (1, 2)),
            ("interactions.1.in2f.weight", (3, 0)),
            ("embedding.weight", (14, 5)),
        ]
    return [
        ("messages.0.filter.weight", (2, 1)),
        ("updates.1.mlp.0.weight", (0, 9)),  # vector-norm half of the update MLP input
        ("messages.1.phi.2.bias", (20,)),
    ]


@pytest.mark.parametrize("cls", MODELS)
def test_double_backward_matches_finite_differences(cls, batch):
    model = _model(cls).train()
    loss = _loss(model, batch)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    params = dict(model.named_parameters())
    h = 1e-6
    for name, idx in _probe_params(cls):
        p = params[name]
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + h
        lp = _loss(model, batch).item()
        with torch.no_grad():
            p[idx] = orig - h
        lm = _loss(model, batch).item()
        with torch.no_grad():
            p[idx] = orig
        fd = (lp - lm) / (2 * h)
        assert p.grad[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("cls", MODELS)
def test_float32_and_no_stress(cls, batch):
    torch.manual_seed(0)
    model = cls(**SMALL).train()
    out = model(batch.to(dtype=torch.float32))
    assert out["energy"].dtype == torch.float32 and out["stress"].dtype == torch.float32
    (out["energy"].sum() + (out["forces"] ** 2).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model64 = _model(cls, compute_stress=False).eval()
    out64 = model64(batch)
    assert set(out64) == {"energy", "forces"}


@pytest.mark.parametrize("cls", MODELS)
def test_non_periodic_molecule(cls):
    mol = Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    batch = make_batch([mol])
    model = _model(cls).eval()
    out = model(batch)
    assert torch.isfinite(out["energy"]).all()
    torch.testing.assert_close(out["forces"].sum(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (out["stress"] == 0).all()


@pytest.mark.parametrize("cls", MODELS)
def test_batching_is_per_structure(cls, batch):
    """Energies of a batch equal the energies of its structures run separately."""
    model = _model(cls).eval()
    joint = model(batch)
    parts = [model(make_batch([s])) for s in _structures()]
    torch.testing.assert_close(joint["energy"], torch.cat([p["energy"] for p in parts]))
    torch.testing.assert_close(joint["forces"], torch.cat([p["forces"] for p in parts]))


def test_registry():
    assert set(MODEL_REGISTRY) >= {"schnet", "painn"}
    assert isinstance(build_model("schnet", hidden=8), SchNet)
    assert isinstance(build_model("PaiNN", hidden=8, num_interactions=1), PaiNN)
    with pytest.raises(ValueError, match="known models: .*painn.*schnet"):
        build_model("nope")


def test_module_structure():
    s = SchNet(hidden=8, num_interactions=3)
    assert [type(m).__name__ for m in s.interactions] == ["SchNetInteraction"] * 3
    p = PaiNN(hidden=8, num_interactions=2)
    assert [type(m).__name__ for m in p.messages] == ["PaiNNMessage"] * 2
    assert [type(m).__name__ for m in p.updates] == ["PaiNNUpdate"] * 2


@pytest.mark.parametrize("cls", MODELS)
def test_symbolic_trace_generalises(cls, batch):
    """make_fx(symbolic) over the batch tensors adds no shape guard, and the captured
    graph (forward + autograd forces/stress) is exact on a batch of other N, E, S."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from janus_compile.data.batch import REQUIRED_FIELDS

    model = _model(cls, num_interactions=1).train()  # one block keeps the trace fast

    def fn(*tensors):
        out = model(AtomsBatch(**dict(zip(REQUIRED_FIELDS, tensors))))
        return out["energy"], out["forces"], out["stress"]

    gm = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
        *[getattr(batch, f) for f in REQUIRED_FIELDS]
    )
    fake = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder")
    assert not fake.fake_mode.shape_env.guards, fake.fake_mode.shape_env.guards
    other = make_batch(_structures(5) + _structures(7)[1:] + [bulk("Cu", "fcc", a=3.6)])
    assert (other.num_atoms, other.num_edges, other.num_structures) != (
        batch.num_atoms,
        batch.num_edges,
        batch.num_structures,
    )
    args = [getattr(other, f) for f in REQUIRED_FIELDS]
    for got, ref in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
