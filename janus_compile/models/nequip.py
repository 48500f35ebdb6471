"""NequIP: an E(3)-equivariant message-passing interatomic potential on e3nn.

After Batzner et al., "E(3)-equivariant graph neural networks for data-efficient and
accurate interatomic potentials", Nat. Commun. 13, 2453 (2022). The layout follows the
reference implementation closely, but everything is small and self-contained:

* species embedding (equivalent to one-hot -> linear) to ``K x 0e`` node features;
* ``num_interactions`` :class:`NequIPInteraction` blocks, each: self-interaction
  linear -> convolution ``TensorProduct(x_j, Y(r_ij), w(|r_ij|))`` with weights from a
  radial MLP on a Bessel basis times a polynomial cutoff -> ``index_add`` onto the
  receiving atom, divided by ``sqrt(avg_num_neighbors)`` -> linear, plus a
  self-connection linear -> gated nonlinearity (:class:`e3nn.nn.Gate`) -> residual
  where the irreps match;
* an output head (two linears down to ``1x0e``), a per-species scale/shift, and a sum
  per structure with ``index_add``.

Forces and stress come from :class:`ConservativeModel` (autograd w.r.t. positions and
a strain), so training differentiates the model twice.

Tracing and TorchScript
-----------------------
The model is meant to be captured with
``torch.fx.experimental.proxy_tensor.make_fx(tracing_mode="symbolic")`` (Dynamo cannot
trace e3nn). e3nn generates code for ``o3.Linear``, ``o3.TensorProduct``,
``nn.Extract`` (inside ``nn.Gate``) and ``o3.SphericalHarmonics``; when its global
optimisation default ``jit_mode`` is ``"script"`` (the legacy ``jit_script_fx=True``;
the default for torch < 2.10) those pieces become ``torch.jit.ScriptModule`` /
scripted functions, which ``make_fx`` cannot trace symbolically. ``NequIP.__init__``
therefore builds all its e3nn modules inside :func:`e3nn_eager_codegen`, which calls
``e3nn.set_optimization_defaults(jit_script_fx=False, jit_mode="eager")`` and restores
the caller's previous defaults on exit (also on error), so importing or constructing
this model never changes e3nn's global settings for other code. The generated code
then stays as plain ``torch.fx.GraphModule`` s / Python functions.

Symbolic sizes
--------------
Atoms N, edges E and structures S stay symbolic in a ``make_fx(tracing_mode="symbolic")``
graph; ``tests/test_nequip.py`` traces on one batch and replays the graph on batches with
other N, E and S (including S = 1) against eager. With e3nn 0.6.0 / torch 2.13 no size
was found specialised (the only shape guard is on the fixed Cartesian dimension, 3 > 2).
The risky spot is the convolution's tensor product: e3nn's generated code broadcasts its
operands with ``expand(torch.broadcast_tensors(x1[..., :1], x2[..., :1], w[..., :1])[0]
.shape[:-1] + (-1,))``, so a leading size must come from a symbolic input dimension, not
from broadcasting against a size-1 or missing one. As a precaution every operand already
carries the same explicit edge dimension: ``x[j]`` and ``Y(r_ij)`` are ``[E, ...]`` and
the weights are ``[E, weight_numel]`` straight from the radial MLP (``shared_weights=False,
internal_weights=False``). No code here calls ``int()`` / ``.item()`` on a size or on
data, and no branch depends on tensor values (the only ``if`` s depend on irreps fixed at
construction).

e3nn's ``nn.Gate`` (via ``nn.Extract``) fills fresh ``new_zeros`` buffers with ``copy_``;
those buffers do not require grad before the copy, so autograd (and double backward) is
unaffected, but the captured aten graph does contain ``copy_`` nodes (as does any
captured backward).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Tuple

import e3nn
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

from ..data.batch import AtomsBatch
from .conservative import ConservativeModel, edge_vectors

__all__ = [
    "NequIP",
    "NequIPInteraction",
    "BesselBasis",
    "PolynomialCutoff",
    "RadialMLP",
    "e3nn_eager_codegen",
]


@contextlib.contextmanager
def e3nn_eager_codegen() -> Iterator[None]:
    """Build e3nn modules without TorchScript (plain fx / Python), then restore defaults.

    e3nn 0.6.0 keeps global defaults in ``e3nn._OPT_DEFAULTS``; ``jit_script_fx=False``
    is the legacy switch and maps to ``jit_mode="eager"``. Restoring sets
    ``jit_script_fx`` first and ``jit_mode`` last, because setting the legacy flag
    rewrites ``jit_mode``.
    """
    previous = e3nn.get_optimization_defaults()
    e3nn.set_optimization_defaults(jit_script_fx=False, jit_mode="eager")
    try:
        yield
    finally:
        restore = {k: v for k, v in previous.items() if k not in ("jit_script_fx", "jit_mode")}
        restore["jit_script_fx"] = previous["jit_script_fx"]
        restore["jit_mode"] = previous["jit_mode"]
        e3nn.set_optimization_defaults(**restore)


class PolynomialCutoff(nn.Module):
    """Smooth envelope u(r) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2), x = r/rc,
    and 0 for r >= rc (Klicpera et al. 2020). Branch-free (``torch.where``)."""

    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.cutoff
        env = (
            1.0
            - (p + 1.0) * (p + 2.0) / 2.0 * torch.pow(x, p)
            + p * (p + 2.0) * torch.pow(x, p + 1.0)
            - p * (p + 1.0) / 2.0 * torch.pow(x, p + 2.0)
        )
        return torch.where(x < 1.0, env, torch.zeros_like(env))


class BesselBasis(nn.Module):
    """e_n(r) = sqrt(2/rc) sin(w_n r / rc) / r with w_n initialised to n*pi (trainable)."""

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = True) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.prefactor = math.sqrt(2.0 / self.cutoff)
        weights = torch.linspace(1.0, float(num_basis), num_basis) * math.pi
        if trainable:
            self.bessel_weights = nn.Parameter(weights)
        else:
            self.register_buffer("bessel_weights", weights)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # r: [E] -> [E, num_basis]
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.bessel_weights * r / self.cutoff) / r


class RadialMLP(nn.Module):
    """Edge-length embedding -> tensor-product weights [E, weight_numel] (SiLU MLP)."""

    def __init__(self, num_in: int, hidden: int, num_layers: int, num_out: int) -> None:
        super().__init__()
        dims = [num_in] + [hidden] * num_layers + [num_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = self.act(x)
        return x


def _conv_irreps(
    irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_target: o3.Irreps
) -> Tuple[o3.Irreps, List[Tuple[int, int, int, str, bool]]]:
    """'uvu' instructions for every path irreps_in x irreps_sh -> an irrep in irreps_target."""
    wanted = {ir for _, ir in irreps_target}
    irreps_mid: List[Tuple[int, o3.Irrep]] = []
    instructions: List[Tuple[int, int, int, str, bool]] = []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted:
                    k = len(irreps_mid)
                    irreps_mid.append((mul, ir_out))
                    instructions.append((i, j, k, "uvu", True))
    mid = o3.Irreps(irreps_mid)
    mid_sorted, p, _ = mid.sort()
    instructions = [(i_1, i_2, p[i_out], mode, train) for i_1, i_2, i_out, mode, train in instructions]
    return mid_sorted, instructions


class NequIPInteraction(nn.Module):
    """One NequIP interaction (convolution + self-connection + gate + residual).

    Submodules: ``linear_1`` (self-interaction before the convolution), ``radial``
    (:class:`RadialMLP` -> per-edge TP weights), ``tp`` (``o3.TensorProduct`` with
    ``shared_weights=False``), ``linear_2`` (after aggregation), ``self_connection``
    (``o3.Linear`` on the block input), ``gate`` (``e3nn.nn.Gate``). Build it inside
    :func:`e3nn_eager_codegen` (``NequIP`` does).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_hidden: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_rbf: int,
        radial_hidden: int = 32,
        radial_layers: int = 2,
        avg_num_neighbors: float = 8.0,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        irreps_sh = o3.Irreps(irreps_sh)
        irreps_hidden = o3.Irreps(irreps_hidden)
        self.inv_sqrt_avg_neighbors = 1.0 / math.sqrt(float(avg_num_neighbors))

        # Gate: scalars (SiLU), one sigmoid gate per non-scalar channel, gated non-scalars.
        # Keep only hidden irreps the convolution can actually produce from irreps_in x sh.
        reachable = {ir_out for _, ir_in in self.irreps_in for _, ir_sh in irreps_sh for ir_out in ir_in * ir_sh}
        irreps_scalars = o3.Irreps([(m, ir) for m, ir in irreps_hidden if ir.l == 0 and ir in reachable]).simplify()
        irreps_gated = o3.Irreps([(m, ir) for m, ir in irreps_hidden if ir.l > 0 and ir in reachable]).simplify()
        gate_ir = o3.Irrep("0e")
        irreps_gates = o3.Irreps([(m, gate_ir) for m, _ in irreps_gated]).simplify()
        act_scalars = {1: nn.functional.silu, -1: torch.tanh}
        act_gates = {1: torch.sigmoid, -1: torch.tanh}
        self.gate = e3nn_nn.Gate(
            irreps_scalars,
            [act_scalars[ir.p] for _, ir in irreps_scalars],
            irreps_gates,
            [act_gates[ir.p] for _, ir in irreps_gates],
            irreps_gated,
        )
        irreps_gate_in = self.gate.irreps_in
        self.irreps_out = self.gate.irreps_out

        self.linear_1 = o3.Linear(self.irreps_in, self.irreps_in)
        irreps_mid, instructions = _conv_irreps(self.irreps_in, irreps_sh, irreps_gate_in)
        self.tp = o3.TensorProduct(
            self.irreps_in,
            irreps_sh,
            irreps_mid,
            instructions,
            shared_weights=False,
            internal_weights=False,
        )
        self.radial = RadialMLP(num_rbf, radial_hidden, radial_layers, self.tp.weight_numel)
        self.linear_2 = o3.Linear(irreps_mid.simplify(), irreps_gate_in)
        self.self_connection = o3.Linear(self.irreps_in, irreps_gate_in)
        self.residual = self.irreps_in == self.irreps_out

    def forward(
        self,
        x: torch.Tensor,  # [N, irreps_in.dim]
        edge_sh: torch.Tensor,  # [E, irreps_sh.dim]
        edge_embedding: torch.Tensor,  # [E, num_rbf], cutoff envelope applied
        receiver: torch.Tensor,  # [E] atom i (gets the message)
        sender: torch.Tensor,  # [E] atom j
    ) -> torch.Tensor:
        sc = self.self_connection(x)
        h = self.linear_1(x)
        # Per-edge weights [E, weight_numel]: with x[j] and Y also [E, ...], e3nn's internal
        # broadcast/expand takes its leading size from one explicit symbolic dim E shared by
        # all three operands (never a size-1/missing dim broadcast up; see module docstring).
        weights = self.radial(edge_embedding)
        messages = self.tp(h[sender], edge_sh, weights)
        # Out-of-place index_add onto fresh zeros: [N, dim] with N symbolic.
        agg = torch.zeros(
            (x.shape[0], messages.shape[1]), dtype=messages.dtype, device=messages.device
        ).index_add(0, receiver, messages)
        h = self.linear_2(agg * self.inv_sqrt_avg_neighbors)
        out = self.gate(h + sc)
        if self.residual:  # static (decided from irreps at construction)
            out = x + out
        return out


class NequIP(ConservativeModel):
    """NequIP-style E(3)-equivariant potential; ``energy(positions, cell, batch) -> [S]``.

    Args:
        num_elements: largest supported atomic number Z (embedding rows 0..num_elements).
        hidden_irreps: node-feature irreps of the interaction blocks.
        lmax: max degree of the edge spherical harmonics.
        num_interactions: number of :class:`NequIPInteraction` blocks.
        num_rbf: number of Bessel radial basis functions.
        cutoff: radial cutoff (Å); must match the neighbour list's.
        compute_stress: also return the stress (see :class:`ConservativeModel`).
        avg_num_neighbors: message normalisation constant (sum / sqrt(avg)).
        radial_hidden, radial_layers: radial MLP width and number of hidden layers.
        polynomial_p: exponent of the polynomial cutoff envelope.

    Submodules: ``embedding`` (nn.Embedding, = one-hot -> linear), ``bessel``,
    ``envelope``, ``sh`` (o3.SphericalHarmonics), ``interactions`` (ModuleList of
    :class:`NequIPInteraction`), ``output_hidden`` and ``output`` (o3.Linear), plus
    parameters ``atomic_scale`` and ``atomic_shift`` (per species).
    """

    def __init__(
        self,
        num_elements: int = 100,
        hidden_irreps: str = "16x0e + 8x1o + 4x2e",
        lmax: int = 2,
        num_interactions: int = 3,
        num_rbf: int = 8,
        cutoff: float = 5.0,
        compute_stress: bool = True,
        avg_num_neighbors: float = 8.0,
        radial_hidden: int = 32,
        radial_layers: int = 2,
        polynomial_p: int = 6,
    ) -> None:
        super().__init__(cutoff=cutoff, compute_stress=compute_stress)
        self.num_elements = int(num_elements)
        self.hidden_irreps = o3.Irreps(hidden_irreps).simplify()
        self.lmax = int(lmax)
        self.avg_num_neighbors = float(avg_num_neighbors)
        num_scalars = sum(mul for mul, ir in self.hidden_irreps if ir == o3.Irrep("0e"))
        if num_scalars == 0:
            raise ValueError(f"hidden_irreps {hidden_irreps!r} needs some 0e channels")

        with e3nn_eager_codegen():
            self.embedding = nn.Embedding(self.num_elements + 1, num_scalars)
            self.bessel = BesselBasis(cutoff, num_rbf)
            self.envelope = PolynomialCutoff(cutoff, polynomial_p)
            self.irreps_sh = o3.Irreps.spherical_harmonics(self.lmax)
            self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
            blocks = []
            irreps = o3.Irreps(f"{num_scalars}x0e")
            for _ in range(num_interactions):
                block = NequIPInteraction(
                    irreps,
                    self.hidden_irreps,
                    self.irreps_sh,
                    num_rbf,
                    radial_hidden=radial_hidden,
                    radial_layers=radial_layers,
                    avg_num_neighbors=avg_num_neighbors,
                )
                blocks.append(block)
                irreps = block.irreps_out
            self.interactions = nn.ModuleList(blocks)
            num_out_hidden = max(num_scalars // 2, 1)
            self.output_hidden = o3.Linear(irreps, o3.Irreps(f"{num_out_hidden}x0e"))
            self.output = o3.Linear(o3.Irreps(f"{num_out_hidden}x0e"), o3.Irreps("1x0e"))
        self.atomic_scale = nn.Parameter(torch.ones(self.num_elements + 1))
        self.atomic_shift = nn.Parameter(torch.zeros(self.num_elements + 1))

    def energy(self, positions: torch.Tensor, cell: torch.Tensor, batch: AtomsBatch) -> torch.Tensor:
        receiver, sender = batch.edge_index[0], batch.edge_index[1]
        vec = edge_vectors(positions, cell, batch)  # [E, 3], r_ij = pos_j - pos_i (+ shift)
        length = torch.linalg.vector_norm(vec, dim=-1)  # [E]
        edge_embedding = self.bessel(length) * self.envelope(length).unsqueeze(-1)
        edge_sh = self.sh(vec)
        x = self.embedding(batch.numbers)
        for block in self.interactions:
            x = block(x, edge_sh, edge_embedding, receiver, sender)
        e = self.output(self.output_hidden(x)).squeeze(-1)  # [N]
        e = e * self.atomic_scale[batch.numbers] + self.atomic_shift[batch.numbers]
        num_structures = cell.shape[0]
        return torch.zeros(num_structures, dtype=e.dtype, device=e.device).index_add(0, batch.batch, e)
