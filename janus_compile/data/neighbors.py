"""Neighbour lists for one structure, via vesin.

vesin is a fast C++ cell-list implementation with the same (i, j, S) convention as
`ase.neighborlist.neighbor_list`: edge (i, j) with integer shift S means

    r_ij = pos[j] - pos[i] + S @ cell

which is exactly what `models.conservative.edge_vectors` recomputes inside the model
(so the model stays differentiable w.r.t. positions and cell while the neighbour search
itself stays outside autograd).
"""
from __future__ import annotations

import logging

import ase
import numpy as np
import torch
import vesin
from ase.neighborlist import neighbor_list as ase_neighbor_list

log = logging.getLogger(__name__)

__all__ = ["neighbor_list"]


def _check_cell(atoms: ase.Atoms) -> tuple[np.ndarray, np.ndarray]:
    """Return (cell, pbc) as float64 / bool arrays, rejecting a periodic axis with no box.

    A non-periodic axis may have any cell vector (zeros included): no shift is ever
    generated along it, so its cell row never enters r_ij.
    """
    cell = np.ascontiguousarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
    if pbc.any():
        lengths = np.linalg.norm(cell, axis=1)
        bad = [ax for ax in range(3) if pbc[ax] and lengths[ax] == 0.0]
        if bad:
            raise ValueError(
                f"structure {atoms.get_chemical_formula()} is periodic along axis/axes {bad} "
                "but its cell vector there is zero: set a cell (atoms.set_cell) or mark the "
                "axis non-periodic (atoms.pbc = ...)"
            )
        if abs(np.linalg.det(cell)) < 1e-12 and pbc.all():
            raise ValueError(
                f"structure {atoms.get_chemical_formula()} is fully periodic but its cell is "
                "singular (zero volume): fix atoms.cell"
            )
    return cell, pbc


def _vesin_ijS(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, atoms: ase.Atoms):
    """vesin's (i, j, S); per-axis periodicity needs vesin >= 0.4, so older versions
    fall back to ASE (same convention, slower) for partially periodic structures."""
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True, sorted=False)
    uniform = bool(pbc.all()) or not pbc.any()
    periodic = bool(pbc[0]) if uniform else pbc
    try:
        return calculator.compute(points=positions, box=cell, periodic=periodic, quantities="ijS", copy=True)
    except (TypeError, ValueError):
        if uniform:
            raise
        log.warning(
            "this vesin (%s) has no per-axis periodicity; using ase.neighborlist for a "
            "partially periodic structure (upgrade vesin for speed)", getattr(vesin, "__version__", "?"),
        )
        return ase_neighbor_list("ijS", atoms, cutoff)


def neighbor_list(
    atoms: ase.Atoms, cutoff: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (i, j) closer than `cutoff` (a full list: both i->j and j->i).

    Returns ``edge_index`` [2, E] int64 and ``shifts`` [E, 3] (`dtype`, integer-valued)
    such that ``r_ij = pos[j] - pos[i] + shifts @ cell``. Works for periodic, partially
    periodic and non-periodic structures (cell of zeros allowed when nothing is
    periodic). Self pairs (i, i, S = 0) are excluded; an atom's own periodic images
    are included. Edges are sorted lexicographically by (i, j, S) so the order is
    deterministic, which keeps scatter-sums in the model bitwise reproducible.
    """
    if not isinstance(atoms, ase.Atoms):
        raise TypeError(f"neighbor_list expects an ase.Atoms, got {type(atoms).__name__}")
    cutoff = float(cutoff)
    if not cutoff > 0.0:
        raise ValueError(f"cutoff must be a positive distance in Å, got {cutoff}")
    cell, pbc = _check_cell(atoms)
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    if len(atoms) == 0:
        return torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0, 3, dtype=dtype)

    i, j, S = _vesin_ijS(positions, cell, pbc, cutoff, atoms)
    i = np.asarray(i).astype(np.int64)
    j = np.asarray(j).astype(np.int64)
    S = np.asarray(S).astype(np.int64).reshape(-1, 3)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    edge_index = torch.from_numpy(np.stack([i[order], j[order]]))
    shifts = torch.from_numpy(S[order]).to(dtype)
    log.debug("neighbor_list: %d atoms, cutoff %.3f Å -> %d edges", len(atoms), cutoff, edge_index.shape[1])
    return edge_index, shifts
