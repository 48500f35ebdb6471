"""The graph batch every JanusPipe model consumes.

One `AtomsBatch` holds several periodic structures concatenated along the atom axis.
Sizes are deliberately free (atoms N, edges E, structures S) so a captured graph stays
symbolic in all three; the field order of `TENSOR_FIELDS` is the order in which a
captured graph takes the batch as inputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Iterator, Optional

import torch

# Fields every model needs (structure + neighbour list).
REQUIRED_FIELDS: tuple[str, ...] = (
    "positions",  # [N, 3] float, Cartesian, Å
    "numbers",  # [N] int64, atomic numbers
    "cell",  # [S, 3, 3] float, rows are lattice vectors (zeros for a non-periodic axis)
    "pbc",  # [S, 3] bool
    "batch",  # [N] int64, structure index of every atom
    "edge_index",  # [2, E] int64, (i, j): atom j is a neighbour of atom i
    "shifts",  # [E, 3] float, integer cell shifts: r_ij = pos[j] - pos[i] + shifts @ cell
)
# Reference labels; present when training.
TARGET_FIELDS: tuple[str, ...] = (
    "energy",  # [S] float, eV
    "forces",  # [N, 3] float, eV/Å
    "stress",  # [S, 3, 3] float, eV/Å^3, ASE sign convention (dE/dε / V)
)
# Full-batch counts a micro-batch's loss is normalised by (0-dim float tensors), so that
# the losses and gradients of the micro-batches add up to those of the whole batch.
NORMALIZER_FIELDS: tuple[str, ...] = (
    "loss_structures",  # structures in the whole batch
    "loss_atoms",  # atoms in the whole batch
)
TENSOR_FIELDS: tuple[str, ...] = REQUIRED_FIELDS + TARGET_FIELDS + NORMALIZER_FIELDS


def present_targets(batch: "AtomsBatch") -> list:
    """The label and normaliser fields ``batch`` carries, in a fixed order: a joint graph
    (whose loss reads them) is captured for one such set."""
    return [f for f in TARGET_FIELDS + NORMALIZER_FIELDS if getattr(batch, f) is not None]


class BatchError(ValueError):
    """A batch is missing a field or has inconsistent shapes."""


@dataclass
class AtomsBatch:
    """Several structures as one graph; see the module docstring for shapes."""

    positions: Optional[torch.Tensor] = None
    numbers: Optional[torch.Tensor] = None
    cell: Optional[torch.Tensor] = None
    pbc: Optional[torch.Tensor] = None
    batch: Optional[torch.Tensor] = None
    edge_index: Optional[torch.Tensor] = None
    shifts: Optional[torch.Tensor] = None
    energy: Optional[torch.Tensor] = None
    forces: Optional[torch.Tensor] = None
    stress: Optional[torch.Tensor] = None
    loss_structures: Optional[torch.Tensor] = None
    loss_atoms: Optional[torch.Tensor] = None

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def num_structures(self) -> int:
        return int(self.cell.shape[0])

    # -- helpers ------------------------------------------------------------------------
    def present(self) -> tuple[str, ...]:
        """Names of the fields that are set, in `TENSOR_FIELDS` order."""
        return tuple(f for f in TENSOR_FIELDS if getattr(self, f) is not None)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.present():
            yield name, getattr(self, name)

    def replace(self, **changes: Optional[torch.Tensor]) -> "AtomsBatch":
        return dataclasses.replace(self, **changes)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "AtomsBatch":
        """Move to a device; `dtype` applies to floating-point fields only."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            out[f.name] = t
        return AtomsBatch(**out)

    def validate(self, need: tuple[str, ...] = REQUIRED_FIELDS) -> "AtomsBatch":
        """Raise `BatchError` naming every missing field and shape mismatch."""
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            hint = []
            if any(f in ("edge_index", "shifts") for f in missing):
                hint.append(
                    "build batches with janus_compile.data.atoms_to_batch(structures, cutoff=...) "
                    "so the neighbour list (edge_index, shifts) is computed"
                )
            if any(f in TARGET_FIELDS for f in missing):
                hint.append(
                    "training needs reference labels: read data with "
                    "janus_compile.data.read_extxyz (energy/forces/stress in the file) or drop "
                    "that term from the loss (e.g. EnergyForceLoss(stress_weight=0))"
                )
            raise BatchError(
                f"batch is missing required field(s) {missing}"
                + (": " + "; ".join(hint) if hint else "")
            )
        n = self.positions.shape[0] if self.positions is not None else None
        s = self.cell.shape[0] if self.cell is not None else None
        checks = [
            ("positions", self.positions, (n, 3)),
            ("numbers", self.numbers, (n,)),
            ("batch", self.batch, (n,)),
            ("cell", self.cell, (s, 3, 3)),
            ("pbc", self.pbc, (s, 3)),
            ("forces", self.forces, (n, 3)),
            ("energy", self.energy, (s,)),
            ("stress", self.stress, (s, 3, 3)),
        ]
        for name, t, shape in checks:
            if t is not None and tuple(t.shape) != tuple(shape):
                raise BatchError(f"batch field {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if self.edge_index is not None and (self.edge_index.dim() != 2 or self.edge_index.shape[0] != 2):
            raise BatchError(f"edge_index must be [2, E], got {tuple(self.edge_index.shape)}")
        if self.shifts is not None and self.edge_index is not None and self.shifts.shape != (self.edge_index.shape[1], 3):
            raise BatchError(
                f"shifts has shape {tuple(self.shifts.shape)}, expected ({self.edge_index.shape[1]}, 3)"
            )
        return self
