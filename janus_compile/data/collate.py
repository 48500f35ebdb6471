"""ASE structures -> `AtomsBatch`, and splitting a batch into pipeline micro-batches.

Conventions (see `batch.py` for shapes):

* the cell is stored exactly as ASE holds it (rows are lattice vectors); a
  non-periodic axis keeps whatever vector ASE has (zeros for a plain molecule). Shifts
  along a non-periodic axis are always 0, so that row never enters r_ij; keeping ASE's
  cell means the volume used for stress is the one ASE used for the reference labels.
* labels keep ASE's units and signs: energy eV, forces eV/Å (= -dE/dpos), stress
  eV/Å^3 exactly as ``atoms.get_stress()`` gives it, i.e. stress = (1/V) dE/dε (a
  crystal stretched past equilibrium has positive diagonal stress), converted from
  Voigt to a full 3x3 matrix. This is the sign the models' autograd stress uses.
* a label is kept for the batch only if *every* structure has it; otherwise that field
  is None for the whole batch (a dense [S, ...] tensor cannot hold holes). Typical case:
  stress is missing for non-periodic structures, so a batch mixing molecules and
  crystals has ``stress=None``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence, Union

import ase
import numpy as np
import torch
from ase.calculators.calculator import PropertyNotImplementedError

try:
    from ase.stress import voigt_6_to_full_3x3_stress
except ImportError:  # pragma: no cover - ASE < 3.23 kept it in ase.constraints
    from ase.constraints import voigt_6_to_full_3x3_stress

from .batch import NORMALIZER_FIELDS, TARGET_FIELDS, AtomsBatch, BatchError
from .neighbors import neighbor_list

log = logging.getLogger(__name__)

__all__ = ["atoms_to_batch", "split_microbatches", "concat_batches", "read_labels"]


# -- labels -----------------------------------------------------------------------------
def _as_full_stress(value) -> np.ndarray:
    """Voigt 6-vector, 9-vector or 3x3 -> 3x3 (ASE stores Voigt, extxyz files 3x3)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape == (6,):
        return voigt_6_to_full_3x3_stress(arr)
    if arr.shape in ((9,), (3, 3)):
        return arr.reshape(3, 3)
    raise ValueError(f"stress must be a Voigt 6-vector or a 3x3 matrix, got shape {arr.shape}")


def _calc_property(atoms: ase.Atoms, name: str, compute: bool = True):
    """A property from the attached calculator, or None when it does not have it.

    With `compute`, goes through `calc.get_property` (what `atoms.get_forces()` etc.
    call), so a live calculator such as EMT computes it and a SinglePointCalculator
    returns its stored value; without, only results already stored for these exact
    atoms are used (no surprise calculations, e.g. when writing a file).
    """
    calc = atoms.calc
    if calc is None:
        return None
    results = getattr(calc, "results", {})
    if not compute:
        if name not in results:
            return None
        if calc.check_state(atoms):
            log.warning(
                "ignoring stale %r label of %s: the structure changed after it was labelled",
                name, atoms.get_chemical_formula(),
            )
            return None
        return results[name]
    try:
        return calc.get_property(name, atoms)
    except (PropertyNotImplementedError, NotImplementedError):
        if name in results:
            # A SinglePointCalculator refuses stored results once the atoms changed.
            log.warning(
                "ignoring stale %r label of %s: the structure changed after it was labelled",
                name, atoms.get_chemical_formula(),
            )
        return None


def read_labels(atoms: ase.Atoms, compute: bool = True) -> dict[str, np.ndarray]:
    """Reference labels of one structure: any of "energy", "forces", "stress" (3x3).

    Looks at the calculator first (computing missing properties only if `compute`),
    then at ``atoms.info["energy"|"stress"]`` and ``atoms.arrays["forces"]`` (how
    labels sit on a structure built by hand).
    """
    out: dict[str, np.ndarray] = {}
    energy = _calc_property(atoms, "energy", compute)
    if energy is None:
        energy = atoms.info.get("energy")
    if energy is not None:
        out["energy"] = np.asarray(energy, dtype=np.float64).reshape(())
    forces = _calc_property(atoms, "forces", compute)
    if forces is None:
        forces = atoms.arrays.get("forces")
    if forces is not None:
        out["forces"] = np.asarray(forces, dtype=np.float64).reshape(len(atoms), 3)
    stress = _calc_property(atoms, "stress", compute)
    if stress is None:
        stress = atoms.info.get("stress")
    if stress is not None:
        out["stress"] = _as_full_stress(stress)
    return out


# -- collate ----------------------------------------------------------------------------
def atoms_to_batch(
    structures: Union[ase.Atoms, Sequence[ase.Atoms]],
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    labels: bool = True,
) -> AtomsBatch:
    """Concatenate structures into one graph batch with neighbour lists at `cutoff`.

    Edge indices are offset by the number of atoms before each structure and edges stay
    grouped by structure in input order (which `split_microbatches` relies on for cheap,
    exact splitting). `dtype` applies to every floating field. Labels (energy, forces,
    stress) are read when `labels` is true; each is set only if all structures have it
    (see the module docstring), so e.g. ``stress`` is None when any structure lacks it.
    """
    if isinstance(structures, ase.Atoms):
        structures = [structures]
    structures = list(structures)
    if not structures:
        raise ValueError("atoms_to_batch needs at least one structure, got an empty list")
    for k, atoms in enumerate(structures):
        if not isinstance(atoms, ase.Atoms):
            raise TypeError(f"structure {k} is a {type(atoms).__name__}, expected ase.Atoms")

    positions, numbers, cells, pbcs, batch, edges, shifts = [], [], [], [], [], [], []
    offset = 0
    for k, atoms in enumerate(structures):
        edge_index, shift = neighbor_list(atoms, cutoff, dtype=dtype)
        positions.append(torch.as_tensor(np.asarray(atoms.positions, dtype=np.float64)))
        numbers.append(torch.as_tensor(np.asarray(atoms.numbers, dtype=np.int64)))
        cells.append(torch.as_tensor(np.asarray(atoms.cell.array, dtype=np.float64)))
        pbcs.append(torch.as_tensor(np.asarray(atoms.pbc, dtype=bool)))
        batch.append(torch.full((len(atoms),), k, dtype=torch.int64))
        edges.append(edge_index + offset)
        shifts.append(shift)
        offset += len(atoms)

    out = AtomsBatch(
        positions=torch.cat(positions).to(dtype),
        numbers=torch.cat(numbers),
        cell=torch.stack(cells).to(dtype),
        pbc=torch.stack(pbcs),
        batch=torch.cat(batch),
        edge_index=torch.cat(edges, dim=1),
        shifts=torch.cat(shifts),
    )
    if labels:
        per_structure = [read_labels(a) for a in structures]
        for name in TARGET_FIELDS:
            have = [name in lab for lab in per_structure]
            if all(have):
                values = [torch.as_tensor(lab[name]) for lab in per_structure]
                joined = torch.cat(values) if name == "forces" else torch.stack(values)
                setattr(out, name, joined.to(dtype))
            elif any(have):
                missing = [k for k, h in enumerate(have) if not h]
                log.warning(
                    "label %r is missing for %d of %d structures (first: %s); leaving "
                    "batch.%s=None for the whole batch",
                    name, len(missing), len(structures), missing[:5], name,
                )
    return out.validate()


# -- micro-batches ----------------------------------------------------------------------
def _structure_sizes(batch: AtomsBatch) -> torch.Tensor:
    return torch.bincount(batch.batch, minlength=batch.num_structures)


def _partition(sizes: list[int], parts: int) -> list[int]:
    """Boundaries (len parts+1) of `parts` non-empty contiguous groups minimising the
    largest group's atom count (a pipeline stage waits for its slowest micro-batch)."""
    n = len(sizes)
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:  # smallest max-load the greedy fill can reach with <= parts groups
        mid = (lo + hi) // 2
        groups, load = 1, 0
        for s in sizes:
            if load + s > mid:
                groups, load = groups + 1, 0
            load += s
        if groups <= parts:
            hi = mid
        else:
            lo = mid + 1
    bounds, load = [0], 0
    for k, s in enumerate(sizes):
        opened = k - bounds[-1]  # structures in the current group
        closed = len(bounds) - 1
        left_after_close = parts - closed - 1
        if opened > 0 and (load + s > lo or n - k == left_after_close):
            bounds.append(k)
            load = 0
        load += s
    bounds.append(n)
    assert len(bounds) == parts + 1, (bounds, parts)
    return bounds


def _edge_structure(batch: AtomsBatch) -> torch.Tensor:
    i, j = batch.edge_index
    es = batch.batch[i]
    if not torch.equal(es, batch.batch[j]):
        raise BatchError("batch has edges between different structures; rebuild it with atoms_to_batch")
    return es


def split_microbatches(batch: AtomsBatch, num_microbatches: int) -> list[AtomsBatch]:
    """Split by whole structures into `num_microbatches` contiguous micro-batches.

    Groups are balanced by atom count (the largest micro-batch is as small as a
    contiguous split allows). Each micro-batch is re-indexed so its own `batch` and
    `edge_index` start at 0. `concat_batches` inverts this exactly when the edges are
    grouped by structure in order, as `atoms_to_batch` produces them.
    """
    batch.validate()
    num_microbatches = int(num_microbatches)
    n_struct = batch.num_structures
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if num_microbatches > n_struct:
        raise ValueError(
            f"cannot split a batch of {n_struct} structure(s) into {num_microbatches} "
            "micro-batches: micro-batches hold whole structures. Use a batch size of at "
            f"least {num_microbatches} structures or set num_microbatches <= {n_struct}"
        )
    sizes = _structure_sizes(batch)
    atom_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    if not torch.all(batch.batch[1:] >= batch.batch[:-1]):
        raise BatchError("batch.batch must be non-decreasing (atoms grouped by structure) to split it")
    edge_struct = _edge_structure(batch)
    sorted_edges = bool(torch.all(edge_struct[1:] >= edge_struct[:-1]))
    if sorted_edges:
        edge_start = torch.searchsorted(edge_struct, torch.arange(n_struct + 1), right=False)

    bounds = _partition(sizes.tolist(), num_microbatches)
    dtype = batch.positions.dtype
    loss_structures = batch.loss_structures if batch.loss_structures is not None else torch.tensor(float(n_struct), dtype=dtype)
    loss_atoms = batch.loss_atoms if batch.loss_atoms is not None else torch.tensor(float(batch.num_atoms), dtype=dtype)
    out = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        a0, a1 = int(atom_start[s0]), int(atom_start[s1])
        if sorted_edges:
            e = slice(int(edge_start[s0]), int(edge_start[s1]))
        else:
            e = ((edge_struct >= s0) & (edge_struct < s1)).nonzero().squeeze(1)
        part = AtomsBatch(
            positions=batch.positions[a0:a1],
            numbers=batch.numbers[a0:a1],
            cell=batch.cell[s0:s1],
            pbc=batch.pbc[s0:s1],
            batch=batch.batch[a0:a1] - s0,
            edge_index=batch.edge_index[:, e] - a0,
            shifts=batch.shifts[e],
            energy=None if batch.energy is None else batch.energy[s0:s1],
            forces=None if batch.forces is None else batch.forces[a0:a1],
            stress=None if batch.stress is None else batch.stress[s0:s1],
            loss_structures=loss_structures,
            loss_atoms=loss_atoms,
        )
        out.append(part)
    log.debug("split %d structures into micro-batches of %s atoms", n_struct,
              [p.num_atoms for p in out])
    return out


def concat_batches(batches: Sequence[AtomsBatch]) -> AtomsBatch:
    """Concatenate batches into one (inverse of `split_microbatches`).

    All batches must have the same set of fields; `batch` and `edge_index` are offset
    by the structures / atoms that come before.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("concat_batches needs at least one batch, got an empty list")
    present = batches[0].present()
    for k, b in enumerate(batches):
        b.validate()
        if b.present() != present:
            raise BatchError(
                f"batch {k} has fields {b.present()} but batch 0 has {present}; "
                "drop or add the differing labels before concatenating"
            )
    out = {}
    atom_off = struct_off = 0
    edge_parts, batch_parts = [], []
    for b in batches:
        edge_parts.append(b.edge_index + atom_off)
        batch_parts.append(b.batch + struct_off)
        atom_off += b.num_atoms
        struct_off += b.num_structures
    out["edge_index"] = torch.cat(edge_parts, dim=1)
    out["batch"] = torch.cat(batch_parts)
    for name in present:
        if name in ("edge_index", "batch") or name in NORMALIZER_FIELDS:
            continue  # the normalisers of micro-batches describe the whole: drop them
        out[name] = torch.cat([getattr(b, name) for b in batches])
    return AtomsBatch(**out)


def edge_shard(batch: AtomsBatch, shard: int, num_shards: int) -> AtomsBatch:
    """The batch with only its ``shard``-th contiguous slice of the edges (graph parallelism).

    Atoms, cells and labels are kept whole (atoms are replicated across gp ranks); the
    edges are split into ``num_shards`` slices whose sizes differ by at most one, so every
    gp rank does the same share of the per-edge work.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"edge shard {shard} does not exist for {num_shards} shard(s)")
    num_edges = batch.num_edges
    if num_edges < num_shards:
        raise BatchError(
            f"a micro-batch with {num_edges} edge(s) cannot be shared by {num_shards} graph-parallel ranks; "
            "use bigger micro-batches (more or larger structures, or fewer micro-batches) or a smaller graph_parallel"
        )
    lo, hi = shard * num_edges // num_shards, (shard + 1) * num_edges // num_shards
    return dataclasses.replace(batch, edge_index=batch.edge_index[:, lo:hi], shifts=batch.shifts[lo:hi])
