"""Training losses on energy, forces and stress.

Written with plain tensor ops and sizes taken from `.shape`, so the joint pass can
trace them symbolically. ``reduction="sum"`` gives per-micro-batch partial sums that
add up exactly to the full-batch loss when the weights are pre-divided by the global
counts (the pipeline runtime does that); ``"mean"`` is the usual per-batch loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

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
        loss = out["energy"].new_zeros(())
        if self.energy_weight:
            diff = out["energy"] - batch.energy
            if self.per_atom_energy:
                n_atoms = torch.zeros_like(diff).index_add(0, batch.batch, torch.ones_like(batch.positions[:, 0]))
                diff = diff / n_atoms
            loss = loss + self.energy_weight * (diff**2).mean()
        if self.force_weight:
            loss = loss + self.force_weight * ((out["forces"] - batch.forces) ** 2).mean()
        if self.stress_weight:
            if "stress" not in out:
                raise BatchError("stress_weight > 0 but the model returns no 'stress': build it with compute_stress=True")
            loss = loss + self.stress_weight * ((out["stress"] - batch.stress) ** 2).mean()
        return loss
