"""NequIP: physics (forces/stress/symmetry), double backward, and symbolic make_fx capture."""
from __future__ import annotations

import e3nn
import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3
from torch.fx.experimental.proxy_tensor import make_fx

from janus_compile.data import AtomsBatch, atoms_to_batch
from janus_compile.models import NequIP
from janus_compile.models.nequip import e3nn_eager_codegen

CUTOFF = 3.0
FIELDS = ("positions", "numbers", "cell", "pbc", "batch", "edge_index", "shifts")


def random_atoms(rng: np.random.Generator, n: int) -> Atoms:
    """Small random triclinic periodic cell with no pair closer than 0.8 Å."""
    while True:
        cell = 3.3 * (np.eye(3) + 0.15 * rng.standard_normal((3, 3)))
        atoms = Atoms(
            numbers=rng.choice([1, 6, 8, 14], size=n),
            scaled_positions=rng.random((n, 3)),
            cell=cell,
            pbc=True,
        )
        if n == 1 or atoms.get_all_distances(mic=True)[np.triu_indices(n, 1)].min() > 0.8:
            return atoms


def make_batch(structures, cutoff: float = CUTOFF, dtype=torch.float64) -> AtomsBatch:
    return atoms_to_batch(structures, cutoff, dtype=dtype, labels=False)


def small_model(seed: int = 0, **kwargs) -> NequIP:
    torch.manual_seed(seed)
    cfg = dict(hidden_irreps="8x0e + 4x1o + 2x2e", num_interactions=2, num_rbf=6, cutoff=CUTOFF, radial_hidden=16)
    cfg.update(kwargs)
    model = NequIP(**cfg).double()
    # Non-trivial per-species scale/shift so those parameters are exercised too.
    with torch.no_grad():
        model.atomic_scale.uniform_(0.5, 1.5)
        model.atomic_shift.normal_()
    return model


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny e3nn graphs are op-overhead bound; intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def batch() -> AtomsBatch:
    rng = np.random.default_rng(1234)
    return make_batch([random_atoms(rng, 3), random_atoms(rng, 4)])


@pytest.fixture(scope="module")
def model() -> NequIP:
    return small_model().eval()


def total_energy(model, batch, positions=None, cell=None) -> torch.Tensor:
    b = batch.replace(
        positions=batch.positions if positions is None else positions,
        cell=batch.cell if cell is None else cell,
    )
    with torch.no_grad():
        return model.energy(b.positions, b.cell, b)


def test_output_shapes_and_dtypes(model, batch):
    out = model(batch)
    assert out["energy"].shape == (2,)
    assert out["forces"].shape == (batch.num_atoms, 3)
    assert out["stress"].shape == (2, 3, 3)
    assert all(v.dtype == torch.float64 for v in out.values())
    assert batch.num_edges > 20  # the test batch really has neighbours, incl. periodic images

    m32 = small_model().float().eval()
    out32 = m32(batch.to(dtype=torch.float32))
    assert all(v.dtype == torch.float32 for v in out32.values())
    torch.testing.assert_close(out32["energy"].double(), out["energy"].detach(), rtol=1e-4, atol=1e-4)


def test_forces_are_minus_finite_difference_gradient(model, batch):
    forces = model(batch)["forces"].detach()
    h = 1e-5
    fd = torch.zeros_like(forces)
    for a in range(batch.num_atoms):
        for k in range(3):
            dp = torch.zeros_like(batch.positions)
            dp[a, k] = h
            ep = total_energy(model, batch, positions=batch.positions + dp).sum()
            em = total_energy(model, batch, positions=batch.positions - dp).sum()
            fd[a, k] = -(ep - em) / (2 * h)
    assert forces.abs().max() > 1e-3
    torch.testing.assert_close(forces, fd, rtol=1e-6, atol=1e-7)


def test_stress_is_strain_derivative_over_volume(model, batch):
    stress = model(batch)["stress"].detach()
    volume = torch.linalg.det(batch.cell).abs()
    h = 1e-5
    fd = torch.zeros_like(stress)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] += 0.5 * h
            eps[b, a] += 0.5 * h

            def strained(sign):
                f = torch.eye(3, dtype=torch.float64) + sign * eps
                return total_energy(model, batch, positions=batch.positions @ f, cell=batch.cell @ f)

            fd[:, a, b] = (strained(1.0) - strained(-1.0)) / (2 * h) / volume
    assert stress.abs().max() > 1e-4
    torch.testing.assert_close(stress, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stress, stress.transpose(-1, -2))


@pytest.mark.parametrize("improper", [False, True])
def test_rotation_invariance_and_force_equivariance(model, batch, improper):
    torch.manual_seed(7)
    R = o3.rand_matrix(dtype=torch.float64)
    if improper:  # rotation-reflection: NequIP with parity is O(3)-invariant
        R = -R
    out = model(batch)
    rot = model(batch.replace(positions=batch.positions @ R.T, cell=batch.cell @ R.T))
    torch.testing.assert_close(rot["energy"], out["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rot["forces"], out["forces"] @ R.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(rot["stress"], R @ out["stress"] @ R.T, rtol=1e-9, atol=1e-10)
    # and translation invariance
    moved = model(batch.replace(positions=batch.positions + torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64)))
    torch.testing.assert_close(moved["energy"], out["energy"], rtol=1e-10, atol=1e-10)


def test_double_backward_parameter_gradients(batch):
    model = small_model(seed=3).train()

    def loss_fn() -> torch.Tensor:
        out = model(batch)
        return out["energy"].sum() + (out["forces"] ** 2).sum()

    model.zero_grad()
    loss_fn().backward()
    params = dict(model.named_parameters())
    picks = [
        ("interactions.0.radial.layers.0.weight", (2, 1)),
        ("interactions.1.linear_2.weight", (5,)),
        ("bessel.bessel_weights", (1,)),
    ]
    checked = 0
    h = 1e-6
    for name, idx in picks:
        p = params[name]
        analytic = p.grad[idx].item()
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + h
        lp = loss_fn().item()
        with torch.no_grad():
            p[idx] = orig - h
        lm = loss_fn().item()
        with torch.no_grad():
            p[idx] = orig
        numeric = (lp - lm) / (2 * h)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-7), name
        checked += 1
    assert checked == 3
    # the force term really reaches the parameters through the double backward
    assert params["interactions.0.radial.layers.0.weight"].grad.abs().max() > 0


def test_e3nn_scripting_is_off_and_defaults_restored():
    before = e3nn.get_optimization_defaults()
    try:
        e3nn.set_optimization_defaults(jit_script_fx=True, jit_mode="script")
        scripted_defaults = e3nn.get_optimization_defaults()
        model = small_model()
        assert e3nn.get_optimization_defaults() == scripted_defaults  # restored
        for name, mod in model.named_modules():
            assert not isinstance(mod, torch.jit.ScriptModule), name
        assert not isinstance(model.sh.sph_func, torch.jit.ScriptFunction)
        # restoring also works when construction fails
        with pytest.raises(RuntimeError):
            with e3nn_eager_codegen():
                assert e3nn.get_optimization_defaults()["jit_mode"] == "eager"
                raise RuntimeError("boom")
        assert e3nn.get_optimization_defaults() == scripted_defaults
    finally:
        e3nn.set_optimization_defaults(**{k: v for k, v in before.items() if k != "jit_mode"})
        e3nn.set_optimization_defaults(jit_mode=before["jit_mode"])
    assert e3nn.get_optimization_defaults() == before


def test_symbolic_make_fx_generalises_over_sizes():
    # Train mode: forces/stress with create_graph=True, as captured for training (the
    # eval-mode graph is the same minus the retained double-backward bookkeeping).
    model = small_model(seed=5).train()

    def fn(positions, numbers, cell, pbc, batch, edge_index, shifts):
        b = AtomsBatch(positions, numbers, cell, pbc, batch, edge_index, shifts)
        out = model(b)
        return out["energy"], out["forces"], out["stress"]

    rng = np.random.default_rng(99)
    example = make_batch([random_atoms(rng, 4), random_atoms(rng, 5)])
    # Distinct example sizes (and none equal to 0, 1 or 3), so duck-sizing can't merge
    # N, E, S with each other or with the fixed 3s.
    sizes = (example.num_atoms, example.num_edges, example.num_structures)
    assert len(set(sizes) | {3}) == 4 and min(sizes) > 1

    args = [getattr(example, f) for f in FIELDS]
    # Parameters are closed over (they become constants of the graph).
    gm = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
    for node in gm.graph.nodes:
        assert node.op != "call_module", node  # pure aten graph, no (Script)Modules left

    others = [
        make_batch([random_atoms(rng, 2), random_atoms(rng, 3), random_atoms(rng, 6)]),
        make_batch([random_atoms(rng, 7)]),  # S = 1
    ]
    for other in others:
        assert (other.num_atoms, other.num_edges, other.num_structures) != sizes
        got = gm(*[getattr(other, f) for f in FIELDS])
        want = fn(*[getattr(other, f) for f in FIELDS])
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-10, atol=1e-10)
