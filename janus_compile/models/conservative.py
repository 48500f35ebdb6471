"""Base class for conservative MLIPs: forces and stress by autograd inside `forward`.

This is the pattern the whole project is about: `forward` computes an energy, then
differentiates it with `torch.autograd.grad(..., create_graph=self.training)` with
respect to the positions and a strain tensor made inside `forward` (the MACE / NequIP
way), so training on forces needs a double backward.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..data.batch import AtomsBatch


def edge_vectors(positions: torch.Tensor, cell: torch.Tensor, batch: AtomsBatch) -> torch.Tensor:
    """r_ij = pos[j] - pos[i] + shifts @ cell[structure of i], shape [E, 3]."""
    i, j = batch.edge_index[0], batch.edge_index[1]
    offsets = torch.einsum("ek,ekl->el", batch.shifts, cell[batch.batch[i]])
    return positions[j] - positions[i] + offsets


class ConservativeModel(nn.Module):
    """Subclasses implement `energy(positions, cell, batch) -> [S]`.

    `forward(batch)` returns ``{"energy": [S], "forces": [N, 3]}`` and, when
    `compute_stress` is set, ``"stress": [S, 3, 3]`` (ASE convention, dE/dε / V).
    """

    def __init__(self, cutoff: float, compute_stress: bool = True) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.compute_stress = compute_stress

    def energy(self, positions: torch.Tensor, cell: torch.Tensor, batch: AtomsBatch) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: AtomsBatch) -> Dict[str, torch.Tensor]:
        positions = batch.positions.clone()
        if not positions.requires_grad:
            positions.requires_grad_(True)
        cell = batch.cell
        wrt = [positions]
        if self.compute_stress:
            displacement = torch.zeros_like(cell).requires_grad_(True)
            symmetric = 0.5 * (displacement + displacement.transpose(-1, -2))
            positions_strained = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch.batch])
            cell = cell + torch.bmm(cell, symmetric)
            wrt.append(displacement)
        else:
            positions_strained = positions
        energy = self.energy(positions_strained, cell, batch)
        grads = torch.autograd.grad([energy.sum()], wrt, create_graph=self.training)
        out = {"energy": energy, "forces": -grads[0]}
        if self.compute_stress:
            volume = torch.linalg.det(batch.cell).abs()
            periodic = volume > 0
            safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
            out["stress"] = grads[1] / safe_volume[:, None, None] * periodic[:, None, None]
        return out
