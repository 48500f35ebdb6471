"""PaiNN: polarizable atom interaction neural network (equivariant message passing).

Reference
---------
K. T. Schütt, O. T. Unke, M. Gastegger, "Equivariant message passing for the prediction
of tensorial properties and molecular spectra", ICML 2021, PMLR 139:9377-9388,
arXiv:2102.03150.

Every atom carries scalar features s [N, F] and vector features v [N, 3, F]. A message
block (paper Eq. 7-8, Fig. 2b) and an update block (Eq. 9-11, Fig. 2c) alternate; each
is its own `nn.Module` so a compiler pass can split the model at module boundaries.

Tracing notes
-------------
Written for `make_fx(tracing_mode="symbolic")` and a double backward: no Python control
flow on tensor values, sizes come from inputs' `.shape`, aggregation is an out-of-place
`index_add` into zeros, and vector norms are sqrt(sum v^2 + eps) because v is zero at the
first layer. SiLU is written out as x * sigmoid(x) so the traced graph holds
`aten.sigmoid` (whose backward reuses its saved output) on the parameter path.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.batch import AtomsBatch
from .conservative import ConservativeModel, edge_vectors
from .schnet import cosine_cutoff

_NORM_EPS = 1e-8


class SigmoidSiLU(nn.Module):
    """SiLU(x) = x * sigmoid(x), written with an explicit sigmoid gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class SincRBF(nn.Module):
    """sin(n pi d / r_c) / d for n = 1..num_rbf (PaiNN paper, Sec. 4)."""

    def __init__(self, num_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, num_rbf + 1, dtype=torch.float32) * (math.pi / cutoff))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        return torch.sin(distances[:, None] * self.freqs) / distances[:, None]


class PaiNNMessage(nn.Module):
    """Message block: equivariant convolution over neighbours.

    phi(s_j) * W(r_ij) is split into (ds, dvv, dvs);
    Δs_i = sum_j ds,  Δv_i = sum_j v_j * dvv + dvs * r_ij / |r_ij|.
    """

    def __init__(self, hidden: int, num_rbf: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), SigmoidSiLU(), nn.Linear(hidden, 3 * hidden))
        self.filter = nn.Linear(num_rbf, 3 * hidden)

    def forward(
        self,
        s: torch.Tensor,
        v: torch.Tensor,
        rbf: torch.Tensor,
        fcut: torch.Tensor,
        unit: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """s: [N, F]; v: [N, 3, F]; rbf: [E, K]; fcut: [E]; unit: [E, 3]; edge_index: [2, E]."""
        i, j = edge_index[0], edge_index[1]
        w = self.filter(rbf) * fcut[:, None]  # [E, 3F]
        x = self.phi(s).index_select(0, j) * w  # [E, 3F]
        ds, dvv, dvs = torch.split(x, self.hidden, dim=-1)
        dv = v.index_select(0, j) * dvv[:, None, :] + unit[:, :, None] * dvs[:, None, :]  # [E, 3, F]
        s = s + torch.zeros_like(s).index_add(0, i, ds)
        v = v + torch.zeros_like(v).index_add(0, i, dv)
        return s, v


class PaiNNUpdate(nn.Module):
    """Update block: atom-wise mixing of scalar and vector channels.

    a = MLP([s, |V v|]) split into (a_vv, a_sv, a_ss);
    Δv = a_vv * (U v),  Δs = a_ss + a_sv * <U v, V v>.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.U = nn.Linear(hidden, hidden, bias=False)
        self.V = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), SigmoidSiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uv = self.U(v)  # [N, 3, F]
        vv = self.V(v)
        vv_norm = torch.sqrt((vv * vv).sum(dim=1) + _NORM_EPS)  # [N, F]
        a = self.mlp(torch.cat([s, vv_norm], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.hidden, dim=-1)
        s = s + a_ss + a_sv * (uv * vv).sum(dim=1)
        v = v + a_vv[:, None, :] * uv
        return s, v


class PaiNN(ConservativeModel):
    """PaiNN energy model; forces and stress come from `ConservativeModel` by autograd.

    Args:
        num_elements: size of the embedding table, indexed directly by atomic number
            (so atomic numbers must be < `num_elements`).
        hidden: feature width F.
        num_interactions: number of (message, update) pairs.
        num_rbf: number of sinc radial basis functions.
        cutoff: radial cutoff in Å (should match the neighbour-list cutoff).
        compute_stress: also return the stress from the strain derivative.

    Submodules: `embedding`, `rbf`, `messages` (ModuleList of `PaiNNMessage`),
    `updates` (ModuleList of `PaiNNUpdate`), `readout` (scalar MLP F -> F/2 -> 1).
    Execution order: messages.0, updates.0, messages.1, updates.1, ...
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
        self.rbf = SincRBF(num_rbf, cutoff)
        self.messages = nn.ModuleList(PaiNNMessage(hidden, num_rbf) for _ in range(num_interactions))
        self.updates = nn.ModuleList(PaiNNUpdate(hidden) for _ in range(num_interactions))
        half = max(hidden // 2, 1)
        self.readout = nn.Sequential(nn.Linear(hidden, half), SigmoidSiLU(), nn.Linear(half, 1))

    def energy(self, positions: torch.Tensor, cell: torch.Tensor, batch: AtomsBatch) -> torch.Tensor:
        vectors = edge_vectors(positions, cell, batch)  # [E, 3]
        distances = torch.sqrt((vectors * vectors).sum(-1))  # edges never have zero length
        unit = vectors / distances[:, None]
        rbf = self.rbf(distances)
        fcut = cosine_cutoff(distances, self.cutoff)
        s = self.embedding(batch.numbers)  # [N, F]
        # [N, 3, F]; the 3 is read from an input shape so symbolic tracing adds no guard
        v = s.new_zeros((s.shape[0], unit.shape[1], self.hidden))
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, rbf, fcut, unit, batch.edge_index)
            s, v = update(s, v)
        e_atom = self.readout(s)[:, 0]  # [N]
        num_structures = cell.shape[0]
        return e_atom.new_zeros(num_structures).index_add(0, batch.batch, e_atom)
