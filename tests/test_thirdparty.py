"""SchNetPack SchNet / PaiNN behind `SchNetPackAdapter`: physics checks and symbolic capture.

Float64 throughout. The capture tests are the point: ``make_fx(tracing_mode="symbolic")``
of the adapter (its forces/stress come from autograd inside schnetpack's own `Forces`
module) must trace and replay a batch with other atom / edge / structure counts.
"""
import numpy as np
import pytest
import torch

# Import our module first: it aliases torch.utils.data.dataloader.T_co, which every
# schnetpack release installable here imports (without it importorskip would skip).
from janus_compile.models import thirdparty  # noqa: E402

spk = pytest.importorskip("schnetpack")

import ase  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from janus_compile.data import REQUIRED_FIELDS, AtomsBatch, atoms_to_batch  # noqa: E402

CUTOFF = 3.0
KINDS = ["schnet", "painn"]


def random_structure(n, rng, scale=1.0, cell=None):
    """n atoms at random (min distance 0.9 Å) in a skewed periodic box."""
    if cell is None:
        lengths = scale * (n * 9.0) ** (1 / 3) * np.array([1.0, 1.1, 0.95])
        cell = np.diag(lengths) + rng.normal(scale=0.25, size=(3, 3))
    atoms = ase.Atoms(numbers=rng.choice([1, 6, 8], size=n), cell=cell, pbc=True)
    pts = []
    while len(pts) < n:
        p = rng.random(3) @ atoms.cell.array
        trial = ase.Atoms("H" * (len(pts) + 1), positions=pts + [p], cell=atoms.cell, pbc=True)
        if len(pts) == 0 or trial.get_distances(len(pts), range(len(pts)), mic=True).min() > 0.9:
            pts.append(p)
    atoms.positions = np.array(pts)
    return atoms


def make_batch(structures, cutoff=CUTOFF):
    return atoms_to_batch(structures, cutoff, dtype=torch.float64, labels=False)


def batch_a():
    rng = np.random.default_rng(0)
    return make_batch([random_structure(3, rng), random_structure(5, rng)])


def batch_b():
    rng = np.random.default_rng(1)
    return make_batch([random_structure(4, rng), random_structure(2, rng), random_structure(6, rng)])


def build(kind, seed=0):
    torch.manual_seed(seed)
    model = thirdparty.schnetpack_model(kind, hidden=16, num_interactions=2, cutoff=CUTOFF).double()
    return model.eval()


def as_inputs(batch):
    return [getattr(batch, f) for f in REQUIRED_FIELDS]


def from_inputs(tensors):
    return AtomsBatch(**dict(zip(REQUIRED_FIELDS, tensors)))


# ---------------------------------------------------------------------------- physics
@pytest.mark.parametrize("kind", KINDS)
def test_forces_are_minus_energy_gradient(kind):
    model = build(kind)
    batch = batch_a()
    out = model(batch)
    assert out["energy"].shape == (2,) and out["forces"].shape == (8, 3)
    assert out["stress"].shape == (2, 3, 3)

    h = 1e-5
    fd = torch.zeros_like(batch.positions)
    for a in range(batch.num_atoms):
        for k in range(3):
            d = torch.zeros_like(batch.positions)
            d[a, k] = h
            ep = model(batch.replace(positions=batch.positions + d))["energy"].sum()
            em = model(batch.replace(positions=batch.positions - d))["energy"].sum()
            fd[a, k] = -(ep - em).detach() / (2 * h)
    torch.testing.assert_close(out["forces"].detach(), fd, rtol=1e-6, atol=1e-8)
    assert out["forces"].abs().max() > 1e-3  # not trivially zero


def strained(batch, eps):
    """Deform every structure by r -> r (I + eps); shifts stay (fractional images)."""
    deform = torch.eye(3, dtype=torch.float64) + eps
    return batch.replace(positions=batch.positions @ deform, cell=batch.cell @ deform)


@pytest.mark.parametrize("kind", KINDS)
def test_stress_is_strain_derivative_over_volume(kind):
    model = build(kind)
    batch = batch_a()
    stress = model(batch)["stress"].detach()
    torch.testing.assert_close(stress, stress.transpose(1, 2), rtol=1e-8, atol=1e-10)

    volume = torch.linalg.det(batch.cell).abs()
    h = 1e-5
    fd = torch.zeros_like(stress)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] += 0.5 * h
            eps[b, a] += 0.5 * h
            ep = model(strained(batch, eps))["energy"].detach()
            em = model(strained(batch, -eps))["energy"].detach()
            fd[:, a, b] = (ep - em) / (2 * h) / volume
    torch.testing.assert_close(stress, fd, rtol=1e-6, atol=1e-8)
    assert stress.abs().max() > 1e-4


def test_stress_sign_and_zero_volume():
    """Left-handed cell: same stress as the right-handed one (|V|); zero cell: stress 0."""
    model = build("schnet")
    rng = np.random.default_rng(3)
    atoms = random_structure(4, rng)
    flipped = atoms.copy()
    flipped.set_cell(atoms.cell.array[[1, 0, 2]], scale_atoms=False)  # same lattice, det < 0
    assert np.linalg.det(flipped.cell.array) < 0
    out = model(make_batch([atoms, flipped]))
    torch.testing.assert_close(out["energy"][0], out["energy"][1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["stress"][0], out["stress"][1], rtol=1e-8, atol=1e-10)

    molecule = ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    out = model(make_batch([molecule, atoms]))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert torch.equal(out["stress"][0], torch.zeros(3, 3, dtype=torch.float64))
    assert out["stress"][1].abs().max() > 0


# --------------------------------------------------------------------------- capture
def _symbolic(t):
    return not isinstance(t, int)


@pytest.mark.parametrize("kind", KINDS)
def test_make_fx_symbolic_matches_eager_on_other_sizes(kind):
    model = build(kind)
    first, second = batch_a(), batch_b()
    assert (first.num_atoms, first.num_edges, first.num_structures) != (
        second.num_atoms,
        second.num_edges,
        second.num_structures,
    )

    def fn(*tensors):
        return model(from_inputs(tensors))

    gm = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*as_inputs(first))
    placeholders = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"}
    vals = list(placeholders.values())
    assert _symbolic(vals[0].shape[0])  # positions: N
    assert _symbolic(vals[2].shape[0])  # cell: S
    assert _symbolic(vals[5].shape[1])  # edge_index: E
    # the scripted scatter would bake in concrete [N, F] zeros: every zeros is symbolic
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.zeros.default:
            assert any(_symbolic(s) for s in node.args[0]), node.format_node()

    for batch in (first, second):
        got = gm(*as_inputs(batch))
        want = model(batch)
        assert set(got) == set(want) == {"energy", "forces", "stress"}
        for key in want:
            torch.testing.assert_close(got[key], want[key].detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_make_fx_symbolic_training_step_double_backward(kind):
    """Train mode: Forces uses create_graph=True, so a force/stress loss has parameter
    gradients (double backward); the whole step captures symbolically and replays."""
    model = build(kind).train()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_(True) for p in model.parameters()]

    def step(params, *tensors):
        out = functional_call(model, dict(zip(names, params)), (from_inputs(tensors),))
        loss = (out["forces"] ** 2).sum() + (out["stress"] ** 2).sum()
        # the energy head's last bias does not enter forces/stress: unused
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        return [loss, *grads]

    gm = make_fx(step, tracing_mode="symbolic", _allow_non_fake_inputs=True)(params, *as_inputs(batch_a()))
    batch = batch_b()
    got = gm(params, *as_inputs(batch))
    want = step(params, *as_inputs(batch))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=1e-9, atol=1e-12)
    # the loss has no energy term: nonzero parameter grads exist only via double backward
    assert sum(bool(w.abs().sum() > 0) for w in want[1:]) >= len(params) - 1


def test_scripted_scatter_restored_after_forward():
    import schnetpack.nn.scatter as spk_scatter

    before = spk_scatter._scatter_add
    build("schnet")(batch_a())
    assert spk_scatter._scatter_add is before
    assert isinstance(before, torch.jit.ScriptFunction)


@pytest.mark.parametrize("kind", KINDS)
def test_janus_compile_matches_eager(kind):
    """Our capture + joint graph on a third-party model: E, F, stress, all parameter grads."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import assert_rel_close, random_batch

    import janus_compile
    from janus_compile import EnergyForceLoss

    torch.manual_seed(0)
    model = thirdparty.schnetpack_model(kind, hidden=8, num_interactions=2, cutoff=3.5).double().train()
    loss_fn = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)
    compiled = janus_compile.compile(model, loss=loss_fn)
    params = dict(model.named_parameters())
    for seed, n_structures in ((1, 2), (2, 3)):
        batch = random_batch(seed, n_structures)
        ref = model(batch)
        ref_loss = loss_fn(ref, batch)
        ref_grads = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
        model.zero_grad(set_to_none=True)
        loss, out = compiled.train_step(batch)
        assert_rel_close(loss, ref_loss.detach(), 1e-10, "loss")
        for key in ("energy", "forces", "stress"):
            assert_rel_close(out[key], ref[key].detach(), 1e-10, key)
        for (name, p), g in zip(params.items(), ref_grads):
            want = torch.zeros_like(p) if g is None else g
            got = torch.zeros_like(p) if p.grad is None else p.grad
            assert_rel_close(got, want, 1e-10, f"grad {name}")
    assert len(compiled._joint_graphs) == 1
