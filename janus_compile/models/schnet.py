"""SchNet: continuous-filter convolutional network for atomistic systems.

References
----------
K. T. Schütt, P.-J. Kindermans, H. E. Sauceda, S. Chmiela, A. Tkatchenko, K.-R. Müller,
"SchNet: A continuous-filter convolutional neural network for modeling quantum
interactions", NeurIPS 30 (2017), arXiv:1706.08566.

K. T. Schütt, H. E. Sauceda, P.-J. Kindermans, A. Tkatchenko, K.-R. Müller,
"SchNet – A deep learning architecture for molecules and materials",
J. Chem. Phys. 148, 241722 (2018), doi:10.1063/1.5019779.

Tracing notes
-------------
The model is written for `make_fx(tracing_mode="symbolic")` and a double backward:
no Python control flow on tensor values, every size comes from an input's `.shape`,
aggregation is an out-of-place `index_add` into zeros, and every op used
(linear, softplus, exp, cos, sqrt, index_select/gather, index_add) has a double-backward
formula. Each interaction block is its own `nn.Module` so a compiler pass can split the
model at module boundaries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import AtomsBatch
from .conservative import ConservativeModel, edge_vectors

_LOG2 = math.log(2.0)


class ShiftedSoftplus(nn.Module):
    """ssp(x) = softplus(x) - log 2, so that ssp(0) = 0 (Schütt et al. 2017)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) - _LOG2


def cosine_cutoff(distances: torch.Tensor, cutoff: float) -> torch.Tensor:
    """f(d) = 0.5 (cos(pi d / r_c) + 1) for d < r_c, else 0; smooth at r_c."""
    inside = (distances < cutoff).to(distances.dtype)
    return 0.5 * (torch.cos(distances * (math.pi / cutoff)) + 1.0) * inside


class GaussianRBF(nn.Module):
    """exp(-gamma (d - mu_k)^2) with `num_rbf` centres evenly spaced on [0, cutoff].

    gamma = 1 / (2 * spacing^2); the 2018 paper uses 0.1 Å spacing and gamma = 10 Å^-2,
    here the spacing follows from `num_rbf` so small models stay smooth.
    """

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        centers = torch.linspace(0.0, cutoff, num_rbf)
        spacing = cutoff / max(num_rbf - 1, 1)
        self.gamma = 0.5 / spacing**2
        self.register_buffer("centers", centers)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        diff = distances[:, None] - self.centers
        return torch.exp(-self.gamma * diff * diff)


class SchNetInteraction(nn.Module):
    """One SchNet interaction block (Schütt et al. 2018, Fig. 2).

    v_i = f2out( sum_j in2f(x)_j * W(r_ij) ),  W(r) = Dense(ssp(Dense(rbf(r)))) * f_cut(r)
    x_i <- x_i + v_i   (residual)
    """

    def __init__(self, hidden: int, num_rbf: int) -> None:
        super().__init__()
        self.filter_net = nn.Sequential(
            nn.Linear(num_rbf, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden)
        )
        self.in2f = nn.Linear(hidden, hidden, bias=False)
        self.f2out = nn.Sequential(nn.Linear(hidden, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))

    def forward(
        self, x: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, edge_index: torch.Tensor
    ) -> torch.Tensor:
        """x: [N, F] atom features; rbf: [E, K]; fcut: [E]; edge_index: [2, E] (i, j)."""
        i, j = edge_index[0], edge_index[1]
        w = self.filter_net(rbf) * fcut[:, None]  # [E, F] continuous filter
        messages = self.in2f(x).index_select(0, j) * w  # x_j * W(r_ij)
        aggregated = torch.zeros_like(x).index_add(0, i, messages)
        return x + self.f2out(aggregated)


class SchNet(ConservativeModel):
    """SchNet energy model; forces and stress come from `ConservativeModel` by autograd.

    Args:
        num_elements: size of the embedding table, indexed directly by atomic number
            (so atomic numbers must be < `num_elements`).
        hidden: feature width F.
        num_interactions: number of `SchNetInteraction` blocks.
        num_rbf: number of Gaussian radial basis functions.
        cutoff: radial cutoff in Å (should match the neighbour-list cutoff).
        compute_stress: also return the stress from the strain derivative.

    Submodules: `embedding`, `rbf`, `interactions` (ModuleList of `SchNetInteraction`),
    `readout` (atom-wise MLP F -> F/2 -> 1).
    """

    def __init__(
        self,
        num_elements: int = 100,
        hidden: int = 64,
        num_interactions: int = 3,
        num_rbf: int = 20,
        cutoff: float = 5.0,
        compute_stress: bool = True,
    ) -> None:
        super().__init__(cutoff=cutoff, compute_stress=compute_stress)
        self.num_elements = num_elements
        self.hidden = hidden
        self.embedding = nn.Embedding(num_elements, hidden)
        self.rbf = GaussianRBF(num_rbf, cutoff)
        self.interactions = nn.ModuleList(SchNetInteraction(hidden, num_rbf) for _ in range(num_interactions))
        half = max(hidden // 2, 1)
        self.readout = nn.Sequential(nn.Linear(hidden, half), ShiftedSoftplus(), nn.Linear(half, 1))

    def energy(self, positions: torch.Tensor, cell: torch.Tensor, batch: AtomsBatch) -> torch.Tensor:
        vectors = edge_vectors(positions, cell, batch)  # [E, 3]
        distances = torch.sqrt((vectors * vectors).sum(-1))  # edges never have zero length
        rbf = self.rbf(distances)
        fcut = cosine_cutoff(distances, self.cutoff)
        x = self.embedding(batch.numbers)
        for block in self.interactions:
            x = block(x, rbf, fcut, batch.edge_index)
        e_atom = self.readout(x)[:, 0]  # [N]
        num_structures = cell.shape[0]
        return e_atom.new_zeros(num_structures).index_add(0, batch.batch, e_atom)
