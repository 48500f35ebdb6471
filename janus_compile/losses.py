"""Training losses on energy, forces and stress.

Written with plain tensor ops and sizes taken from `.shape`, so the joint pass can
trace them symbolically. ``reduction="sum"`` gives per-micro-batch partial sums that
add up exactly to the full-batch loss when the weights are pre-divided by the global
counts (the pipeline runtime does that); ``"mean"`` is the usual per-batch loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .data.batch import AtomsBatch, BatchError


@dataclass
class EnergyForceLoss:
    """w_E·mean_S((E-E_ref)/n_atoms)² + w_F·mean_{N,3}(F-F_ref)² + w_σ·mean_{S,3,3}(σ-σ_ref)²."""

    energy_weight: float = 1.0
    force_weight: float = 10.0
    stress_weight: float = 0.0
    per_atom_energy: bool = True

    def required_targets(self) -> tuple[str, ...]:
        need = []
        if self.energy_weight:
            need.append("energy")
        if self.force_weight:
            need.append("forces")
        if self.stress_weight:
            need.append("stress")
        return tuple(need)

    def check(self, batch: AtomsBatch) -> None:
        missing = [t for t in self.required_targets() if getattr(batch, t) is None]
        if missing:
            raise BatchError(
                f"the loss needs reference {missing} but the batch has none: read labelled data "
                "(janus_compile.data.read_extxyz / emt_dataset) or set the weight of that term to 0"
            )

    def __call__(self, out: Mapping[str, torch.Tensor], batch: AtomsBatch) -> torch.Tensor:
        """Means over this batch, or, for a micro-batch (``batch.loss_structures`` and
        ``batch.loss_atoms`` set), sums divided by the whole batch's counts."""
        loss = out["energy"].new_zeros(())
        if self.energy_weight:
            diff = out["energy"] - batch.energy
            if self.per_atom_energy:
                n_atoms = torch.zeros_like(diff).index_add(0, batch.batch, torch.ones_like(batch.positions[:, 0]))
                diff = diff / n_atoms
            loss = loss + self.energy_weight * _mean(diff**2, batch.loss_structures, 1)
        if self.force_weight:
            loss = loss + self.force_weight * _mean((out["forces"] - batch.forces) ** 2, batch.loss_atoms, 3)
        if self.stress_weight:
            if "stress" not in out:
                raise BatchError("stress_weight > 0 but the model returns no 'stress': build it with compute_stress=True")
            loss = loss + self.stress_weight * _mean((out["stress"] - batch.stress) ** 2, batch.loss_structures, 9)
        return loss


def _mean(values: torch.Tensor, count: Optional[torch.Tensor], per_item: int) -> torch.Tensor:
    """values.mean(), or values.sum() / (count · per_item) for a micro-batch of a larger batch."""
    if count is None:
        return values.mean()
    return values.sum() / (count * per_item)
