"""Tests for janus_compile.data: neighbour lists, collation, micro-batches, extxyz, EMT data."""
from __future__ import annotations

import itertools
import logging

import ase
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list
from ase.stress import voigt_6_to_full_3x3_stress
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_compile.data import (
    REQUIRED_FIELDS,
    TARGET_FIELDS,
    TENSOR_FIELDS,
    AtomsBatch,
    BatchError,
    atoms_to_batch,
    concat_batches,
    emt_dataset,
    large_structure,
    neighbor_list,
    read_extxyz,
    split_microbatches,
    write_extxyz,
)
from janus_compile.data import emt as emt_module
from janus_compile.data.collate import _partition


# -- helpers ----------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Never let a test write to ~/.cache: point the default cache at tmp_path."""
    monkeypatch.setenv("JANUSPIPE_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[ase.Atoms]:
    return emt_dataset("cu-al", num_structures=6, seed=3, size=(8, 16), cache_dir=tmp_path_factory.mktemp("emt"))


def random_structure(seed: int, n_atoms: int, pbc, zero_cell: bool = False) -> ase.Atoms:
    """Random triclinic box (or none) with atoms also placed a bit outside it."""
    rng = np.random.default_rng(seed)
    cell = rng.uniform(2.5, 6.0) * (np.eye(3) + rng.uniform(-0.3, 0.3, size=(3, 3)))
    frac = rng.uniform(-0.2, 1.2, size=(n_atoms, 3))
    atoms = ase.Atoms(numbers=rng.integers(1, 30, n_atoms), positions=frac @ cell, cell=cell, pbc=pbc)
    if zero_cell:
        cell_ = atoms.cell.array.copy()
        cell_[~np.asarray(pbc, dtype=bool)] = 0.0
        atoms.cell = cell_
    return atoms


def triples(i, j, S) -> set:
    return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.asarray(S).astype(int).tolist())))


def edge_vectors(batch: AtomsBatch) -> torch.Tensor:
    """The model's convention (models.conservative.edge_vectors), inlined."""
    i, j = batch.edge_index
    return batch.positions[j] - batch.positions[i] + torch.einsum("ek,ekl->el", batch.shifts, batch.cell[batch.batch[i]])


def assert_batches_equal(a: AtomsBatch, b: AtomsBatch) -> None:
    assert a.present() == b.present()
    for name in a.present():
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


# -- neighbour lists --------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_atoms=st.integers(1, 8),
    pbc=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    zero_cell=st.booleans(),
    cutoff=st.floats(1.0, 6.0),
)
def test_neighbor_list_matches_ase(seed, n_atoms, pbc, zero_cell, cutoff):
    atoms = random_structure(seed, n_atoms, pbc, zero_cell=zero_cell)
    edge_index, shifts = neighbor_list(atoms, cutoff)
    assert edge_index.dtype == torch.int64 and shifts.dtype == torch.float64
    assert edge_index.shape == (2, shifts.shape[0]) and shifts.shape[1] == 3
    i, j, S, d = ase_neighbor_list("ijSd", atoms, cutoff)
    ours = triples(edge_index[0], edge_index[1], shifts)
    assert len(ours) == edge_index.shape[1], "duplicate edges"
    assert ours == triples(i, j, S)
    # same distances, with the model's convention r_ij = pos[j] - pos[i] + S @ cell
    pos, cell = atoms.positions, atoms.cell.array
    vec = pos[edge_index[1]] - pos[edge_index[0]] + shifts.numpy() @ cell
    dist = dict(zip(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())), d))
    ours_d = np.linalg.norm(vec, axis=1)
    keys = list(zip(edge_index[0].tolist(), edge_index[1].tolist(), map(tuple, shifts.long().tolist())))
    np.testing.assert_allclose(ours_d, [dist[k] for k in keys], rtol=0, atol=1e-10)
    assert np.all(ours_d < cutoff)
    # no shift along a non-periodic axis
    assert not shifts[:, ~torch.tensor(pbc)].any()


def test_neighbor_list_molecule_and_edge_cases():
    mol = molecule("CH3CH2OH")  # cell of zeros, pbc False
    assert not mol.cell.any()
    edge_index, shifts = neighbor_list(mol, 2.0)
    assert triples(edge_index[0], edge_index[1], shifts) == triples(*ase_neighbor_list("ijS", mol, 2.0))
    assert not shifts.any()
    # deterministic, sorted by i
    again, _ = neighbor_list(mol, 2.0)
    assert torch.equal(edge_index, again)
    assert torch.all(edge_index[0][1:] >= edge_index[0][:-1])

    empty_e, empty_s = neighbor_list(ase.Atoms(), 3.0)
    assert empty_e.shape == (2, 0) and empty_s.shape == (0, 3)
    single = bulk("Cu", "fcc", a=3.6)  # one atom: only its own images
    e, s = neighbor_list(single, 3.0)
    assert e.shape[1] == 12 and torch.all(e == 0)

    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list(mol, 0.0)
    broken = bulk("Cu", "fcc", a=3.6)
    broken.cell[2] = 0.0
    with pytest.raises(ValueError, match="periodic along axis"):
        neighbor_list(broken, 3.0)
    with pytest.raises(TypeError):
        neighbor_list([mol], 3.0)


def test_neighbor_list_falls_back_without_per_axis_pbc(monkeypatch, caplog):
    """vesin < 0.4 only takes one bool for periodicity: slabs go through ASE instead."""
    import janus_compile.data.neighbors as nb

    class OldNeighborList(nb.vesin.NeighborList):
        def compute(self, points, box, periodic, quantities="ij", copy=True):
            if not isinstance(periodic, bool):
                raise ValueError("The truth value of an array with more than one element is ambiguous")
            return super().compute(points=points, box=box, periodic=periodic, quantities=quantities, copy=copy)

    monkeypatch.setattr(nb.vesin, "NeighborList", OldNeighborList)
    slab = random_structure(0, 6, (True, False, True))
    with caplog.at_level(logging.WARNING, logger="janus_compile.data.neighbors"):
        e, s = neighbor_list(slab, 4.0)
    assert "per-axis" in caplog.text
    assert triples(e[0], e[1], s) == triples(*ase_neighbor_list("ijS", slab, 4.0))
    crystal = random_structure(1, 4, (True, True, True))
    e, s = neighbor_list(crystal, 4.0)
    assert triples(e[0], e[1], s) == triples(*ase_neighbor_list("ijS", crystal, 4.0))


# -- collate ----------------------------------------------------------------------------
def test_atoms_to_batch_shapes_and_labels(dataset):
    cutoff = 4.5
    batch = atoms_to_batch(dataset, cutoff)
    assert batch.present() == REQUIRED_FIELDS + TARGET_FIELDS
    n = sum(len(a) for a in dataset)
    assert (batch.num_atoms, batch.num_structures) == (n, len(dataset))
    assert batch.positions.dtype == torch.float64 and batch.numbers.dtype == torch.int64
    assert batch.pbc.dtype == torch.bool and batch.edge_index.dtype == torch.int64
    assert torch.equal(batch.batch, torch.repeat_interleave(torch.arange(len(dataset)), torch.tensor([len(a) for a in dataset])))

    offset, edge_offset = 0, 0
    for k, atoms in enumerate(dataset):
        e, s = neighbor_list(atoms, cutoff)
        sl = slice(edge_offset, edge_offset + e.shape[1])
        assert torch.equal(batch.edge_index[:, sl], e + offset)
        assert torch.equal(batch.shifts[sl], s)
        assert torch.equal(batch.cell[k], torch.tensor(atoms.cell.array))
        assert batch.energy[k].item() == atoms.get_potential_energy()
        np.testing.assert_array_equal(batch.forces[offset:offset + len(atoms)].numpy(), atoms.get_forces())
        np.testing.assert_array_equal(batch.stress[k].numpy(), voigt_6_to_full_3x3_stress(atoms.get_stress(voigt=True)))
        offset += len(atoms)
        edge_offset += e.shape[1]
    assert edge_offset == batch.num_edges

    # the model's edge vectors equal ASE's distance vectors
    i, j, D = ase_neighbor_list("ijD", dataset[0], cutoff)
    one = atoms_to_batch(dataset[0], cutoff)  # a single Atoms is accepted too
    vec = edge_vectors(one)
    ref = dict(zip(zip(i.tolist(), j.tolist(), map(tuple, ase_neighbor_list("S", dataset[0], cutoff).tolist())), D))
    keys = zip(one.edge_index[0].tolist(), one.edge_index[1].tolist(), map(tuple, one.shifts.long().tolist()))
    np.testing.assert_allclose(vec.numpy(), np.stack([ref[k] for k in keys]), atol=1e-10)

    f32 = atoms_to_batch(dataset, cutoff, dtype=torch.float32)
    assert all(getattr(f32, f).dtype == torch.float32 for f in ("positions", "cell", "shifts", "energy", "forces", "stress"))
    bare = atoms_to_batch(dataset, cutoff, labels=False)
    assert bare.present() == REQUIRED_FIELDS


def test_atoms_to_batch_partial_labels(dataset, caplog):
    mol = molecule("H2O")
    mol.calc = SinglePointCalculator(mol, energy=-1.5, forces=np.ones((3, 3)))  # no stress
    hand = dataset[1].copy()  # labels given via info/arrays instead of a calculator
    hand.info["energy"] = 2.0
    hand.arrays["forces"] = np.zeros((len(hand), 3))
    with caplog.at_level(logging.WARNING, logger="janus_compile.data.collate"):
        batch = atoms_to_batch([dataset[0], mol, hand], cutoff=4.0)
    assert batch.stress is None  # one structure lacks stress -> none for the whole batch
    assert "stress" in caplog.text
    assert batch.energy.tolist() == [dataset[0].get_potential_energy(), -1.5, 2.0]
    assert batch.forces.shape == (len(dataset[0]) + 3 + len(hand), 3)
    assert not batch.pbc[1].any() and not batch.cell[1].any()
    with pytest.raises(BatchError, match="stress"):
        batch.validate(need=TENSOR_FIELDS)
    with pytest.raises(ValueError, match="at least one"):
        atoms_to_batch([], 4.0)


def test_emt_stress_and_forces_follow_ase_sign(dataset):
    """batch.stress == (1/V) dE/dε and batch.forces == -dE/dpos (finite differences)."""
    atoms = next(a for a in dataset if a.pbc.all())
    batch = atoms_to_batch([atoms], cutoff=4.0)
    base = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
    volume = base.get_volume()
    h = 1e-5

    def energy(at: ase.Atoms) -> float:
        at.calc = EMT()
        return at.get_potential_energy()

    fd_stress = np.zeros((3, 3))
    for a, b in itertools.product(range(3), repeat=2):
        e = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += 0.5 * sign * h
            eps[b, a] += 0.5 * sign * h
            strained = base.copy()
            strained.set_cell(base.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            e.append(energy(strained))
        fd_stress[a, b] = (e[0] - e[1]) / (2 * h) / volume
    np.testing.assert_allclose(batch.stress[0].numpy(), fd_stress, atol=1e-7)
    assert np.abs(fd_stress).max() > 1e-3  # strained: stress is non-trivial

    for atom, axis in [(0, 0), (len(atoms) - 1, 2)]:
        e = []
        for sign in (1, -1):
            moved = base.copy()
            moved.positions[atom, axis] += sign * h
            e.append(energy(moved))
        assert batch.forces[atom, axis].item() == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=1e-6)


# -- micro-batches ----------------------------------------------------------------------
def _brute_force_minimax(sizes: list[int], parts: int) -> int:
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), parts - 1):
        bounds = (0, *cuts, len(sizes))
        load = max(sum(sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        best = load if best is None else min(best, load)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=9), st.data())
def test_partition_is_contiguous_and_optimal(sizes, data):
    parts = data.draw(st.integers(1, len(sizes)))
    bounds = _partition(sizes, parts)
    assert bounds[0] == 0 and bounds[-1] == len(sizes) and len(bounds) == parts + 1
    assert all(a < b for a, b in zip(bounds[:-1], bounds[1:])), "every micro-batch holds a structure"
    load = max(sum(sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    assert load == _brute_force_minimax(sizes, parts)


@pytest.fixture(scope="module")
def mixed_batch(dataset) -> AtomsBatch:
    return atoms_to_batch(dataset, cutoff=4.0)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 6))
def test_split_concat_round_trip(mixed_batch, k):
    parts = split_microbatches(mixed_batch, k)
    assert len(parts) == k
    for p in parts:
        p.validate(need=TENSOR_FIELDS)
        assert p.batch[0] == 0 and p.num_structures >= 1
        assert int(p.batch.max()) == p.num_structures - 1
        assert p.edge_index.min() >= 0 and p.edge_index.max() < p.num_atoms
        assert torch.equal(p.batch[p.edge_index[0]], p.batch[p.edge_index[1]])
    assert sum(p.num_atoms for p in parts) == mixed_batch.num_atoms
    assert_batches_equal(concat_batches(parts), mixed_batch)
    # the model sees the same edge vectors before and after the split
    assert torch.equal(torch.cat([edge_vectors(p) for p in parts]), edge_vectors(mixed_batch))


def test_split_errors_and_concat_mismatch(mixed_batch):
    with pytest.raises(ValueError, match="num_microbatches <= 6"):
        split_microbatches(mixed_batch, 7)
    with pytest.raises(ValueError, match=">= 1"):
        split_microbatches(mixed_batch, 0)
    a, b = split_microbatches(mixed_batch, 2)
    with pytest.raises(BatchError, match="fields"):
        concat_batches([a, b.replace(stress=None)])
    with pytest.raises(ValueError):
        concat_batches([])
    # a batch without labels splits and joins too
    bare = mixed_batch.replace(energy=None, forces=None, stress=None)
    assert_batches_equal(concat_batches(split_microbatches(bare, 3)), bare)


# -- extxyz -----------------------------------------------------------------------------
def test_extxyz_round_trip(dataset, tmp_path):
    path = write_extxyz(tmp_path / "sub" / "data.extxyz", dataset)
    back = read_extxyz(path, require_labels=True)
    assert len(back) == len(dataset)
    for a, b in zip(dataset, back):
        assert (a.numbers == b.numbers).all() and (a.pbc == b.pbc).all()
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)
        assert a.get_potential_energy() == b.get_potential_energy()
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-8)
        np.testing.assert_allclose(a.get_stress(), b.get_stress(), atol=1e-14)
    assert len(read_extxyz(path, index="1:3")) == 2
    assert len(read_extxyz(path, index=0)) == 1
    assert not list(tmp_path.glob("sub/*.tmp"))  # atomic write left no temp file


def test_extxyz_label_sources_and_errors(tmp_path):
    live = bulk("Cu", "fcc", a=3.6, cubic=True)
    live.rattle(0.05, seed=0)
    live.calc = EMT()
    energy, stress = live.get_potential_energy(), live.get_stress()
    forces = live.get_forces()
    live.info["energy"] = 123.0  # a clash ASE would refuse; the calculator wins
    mol = molecule("H2O")  # no labels at all
    path = write_extxyz(tmp_path / "mixed.extxyz", [live, mol])
    back = read_extxyz(path)
    assert back[0].get_potential_energy() == energy
    np.testing.assert_allclose(back[0].get_stress(), stress, atol=1e-14)
    np.testing.assert_allclose(back[0].get_forces(), forces, atol=1e-8)
    with pytest.raises(ValueError, match="structure 1 has no"):
        read_extxyz(path, require_labels=True)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_extxyz(tmp_path / "missing.extxyz")
    (tmp_path / "empty.extxyz").write_text("")
    with pytest.raises(ValueError, match="no structures"):
        read_extxyz(tmp_path / "empty.extxyz")

    # labels under other names
    ref = bulk("Al", "fcc", a=4.0, cubic=True)
    ref.info["REF_energy"] = -3.25
    ref.arrays["REF_forces"] = np.full((4, 3), 0.5)
    ref.info["REF_stress"] = np.diag([0.1, 0.2, 0.3]).ravel()
    ase.io.write(tmp_path / "ref.extxyz", ref)
    with pytest.raises(ValueError, match="energy_key"):
        read_extxyz(tmp_path / "ref.extxyz", require_labels=True)
    got = read_extxyz(
        tmp_path / "ref.extxyz", require_labels=True,
        energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress",
    )[0]
    assert got.get_potential_energy() == -3.25
    np.testing.assert_array_equal(got.get_forces(), np.full((4, 3), 0.5))
    np.testing.assert_allclose(got.get_stress(), [0.1, 0.2, 0.3, 0, 0, 0])
    assert "REF_energy" not in got.info


# -- EMT data set -----------------------------------------------------------------------
def test_emt_dataset_properties(dataset):
    assert len(dataset) == 6
    kinds = [frozenset(a.get_chemical_symbols()) for a in dataset]
    assert {frozenset({"Cu"}), frozenset({"Al"}), frozenset({"Cu", "Al"})} <= set(kinds)
    assert {a.info["config_type"] for a in dataset} <= {"rattle", "md"}
    for a in dataset:
        assert 8 <= len(a) <= 16 and a.pbc.all()
        assert isinstance(a.calc, SinglePointCalculator)
        assert np.isfinite(a.get_potential_energy())
        assert a.get_forces().shape == (len(a), 3) and np.abs(a.get_forces()).max() > 1e-3
        assert np.abs(a.get_stress()).max() > 1e-4


def test_emt_dataset_cache_and_determinism(tmp_path, monkeypatch):
    kwargs = dict(name="cu", num_structures=3, seed=11, size=8, md_fraction=0.5)
    first = emt_dataset(**kwargs, cache_dir=tmp_path / "a")
    files = list((tmp_path / "a").glob("*.extxyz"))
    assert len(files) == 1 and "seed11" in files[0].name
    assert not list((tmp_path / "a").glob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(emt_module, "_generate", boom)
    cached = emt_dataset(**kwargs, cache_dir=tmp_path / "a")
    monkeypatch.undo()
    monkeypatch.setenv("JANUSPIPE_CACHE", str(tmp_path / "env"))
    fresh = emt_dataset(**kwargs)  # default cache dir from $JANUSPIPE_CACHE, regenerated
    assert list((tmp_path / "env").glob("*.extxyz"))
    for a, b, c in zip(first, cached, fresh):
        for other in (b, c):
            np.testing.assert_array_equal(a.positions, other.positions)
            np.testing.assert_array_equal(a.cell.array, other.cell.array)
            assert a.get_potential_energy() == other.get_potential_energy()
            np.testing.assert_array_equal(a.get_forces(), other.get_forces())
            np.testing.assert_array_equal(a.get_stress(), other.get_stress())
    different = emt_dataset(**{**kwargs, "seed": 12}, cache_dir=tmp_path / "a")
    assert len(list((tmp_path / "a").glob("*.extxyz"))) == 2
    assert different[0].get_potential_energy() != first[0].get_potential_energy()

    # a corrupt cache file is regenerated, not trusted
    files[0].write_text("garbage\n")
    again = emt_dataset(**kwargs, cache_dir=tmp_path / "a")
    assert again[0].get_potential_energy() == first[0].get_potential_energy()

    with pytest.raises(ValueError, match="unknown EMT data set"):
        emt_dataset("si", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="size"):
        emt_dataset("cu", num_structures=1, size=(10, 5), cache_dir=tmp_path)


def test_large_structure():
    atoms = large_structure(1000, element="Cu", seed=0)
    assert len(atoms) >= 1000 and len(atoms) < 1300
    assert atoms.pbc.all() and set(atoms.get_chemical_symbols()) == {"Cu"}
    assert atoms.get_forces().shape == (len(atoms), 3)
    assert np.abs(atoms.get_stress()).max() > 1e-4
    with pytest.raises(ValueError, match="EMT"):
        large_structure(1000, element="Si")
