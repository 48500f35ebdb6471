"""Third-party MLIPs behind our `AtomsBatch` interface.

`schnetpack_model(...)` builds a SchNetPack (``pip install schnetpack``; 2.0.4 is the
newest release that installs next to torch 2.13 on Python 3.11) SchNet or PaiNN
`NeuralNetworkPotential` with its own `Strain` input module and `Forces` output module,
so forces and stress come from `torch.autograd.grad` *inside* the third-party model
(with ``create_graph=self.training``, so training on forces has a double backward),
and wraps it in `SchNetPackAdapter`, whose ``forward(batch)`` returns
``{"energy": [S], "forces": [N, 3], "stress": [S, 3, 3]}`` like our own
`ConservativeModel`.

SchNetPack as shipped cannot be captured with
``make_fx(..., tracing_mode="symbolic")``; the adapter works around exactly two things
and changes nothing else in the third-party code:

1. ``schnetpack.nn.scatter._scatter_add`` (behind every ``snn.scatter_add``: SchNet and
   PaiNN message passing, `Atomwise` pooling) is a ``@torch.jit.script`` function.
   Called under make_fx it does *not* raise: the TorchScript interpreter turns the
   symbolic ``dim_size`` and ``x.shape`` into concrete ints, so the captured graph has
   ``aten.zeros([5, 4])`` baked in and fails (index out of bounds) or is silently wrong
   for a batch of another size. While the adapter runs, `traceable_scatter()` swaps in
   the same function body, not scripted (same ops: ``zeros`` + ``index_add``).
2. `Atomwise.forward` takes the number of structures as ``maxm = int(idx_m[-1]) + 1``:
   a data-dependent int (``GuardOnDataDependentSymNode`` under symbolic tracing). The
   subclass `SymbolicAtomwise` overrides that one method and reads the count from the
   shape of ``inputs["_n_atoms"]`` ([S], built by the adapter from ``cell.shape[0]``).

Also: every schnetpack release that installs on Python 3.11 imports ``T_co`` from
``torch.utils.data.dataloader``, renamed ``_T_co`` in recent torch; importing this
module adds the old name back as an alias (only when missing) so ``import schnetpack``
works.

Stress follows the ASE convention used by `ConservativeModel`: (1/|V|) dE/dε, zero for
a structure whose cell has zero volume. SchNetPack divides by the *signed* triple
product of the cell (0/0 for a zero cell, wrong sign for a left-handed cell); the
adapter hands it a unit cell for zero-volume structures (the cell enters SchNetPack only
through that volume: the adapter computes the Cartesian offsets itself) and fixes the
sign afterwards.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator

import torch
from torch import nn

from ..data.batch import AtomsBatch

__all__ = [
    "SchNetPackAdapter",
    "import_schnetpack",
    "schnetpack_inputs",
    "schnetpack_model",
    "traceable_scatter",
]


def _install_torch_compat() -> None:
    """``from torch.utils.data.dataloader import T_co`` (schnetpack/data/loader.py)."""
    try:
        import torch.utils.data.dataloader as dl
    except Exception:  # pragma: no cover - torch without data utils
        return
    if not hasattr(dl, "T_co") and hasattr(dl, "_T_co"):
        dl.T_co = dl._T_co


_install_torch_compat()


def import_schnetpack():
    """Import and return the `schnetpack` module (ImportError if not installed)."""
    _install_torch_compat()
    import schnetpack

    return schnetpack


def _scatter_add_eager(x: torch.Tensor, idx_i: torch.Tensor, dim_size: int, dim: int = 0) -> torch.Tensor:
    # Body of schnetpack.nn.scatter._scatter_add, minus @torch.jit.script (still
    # scriptable, so torch.jit.script of a schnetpack model keeps working inside the
    # context below).
    shape = list(x.shape)
    shape[dim] = dim_size
    tmp = torch.zeros(shape, dtype=x.dtype, device=x.device)
    y = tmp.index_add(dim, idx_i, x)
    return y


@contextlib.contextmanager
def traceable_scatter() -> Iterator[None]:
    """Within the block, schnetpack's scatter_add runs as plain Python ops (see module doc)."""
    import schnetpack.nn.scatter as spk_scatter

    previous = spk_scatter._scatter_add
    spk_scatter._scatter_add = _scatter_add_eager
    try:
        yield
    finally:
        spk_scatter._scatter_add = previous


@functools.lru_cache(maxsize=None)
def _symbolic_atomwise_cls():
    spk = import_schnetpack()
    import schnetpack.nn as snn
    import schnetpack.properties as props

    class SymbolicAtomwise(spk.atomistic.Atomwise):
        """`Atomwise` with the number of structures taken from a shape, not a value."""

        def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            y = self.outnet(inputs["scalar_representation"])
            if self.per_atom_output_key is not None:
                inputs[self.per_atom_output_key] = y
            if self.aggregation_mode is not None:
                idx_m = inputs[props.idx_m]
                # upstream: maxm = int(idx_m[-1]) + 1  (data-dependent)
                maxm = inputs[props.n_atoms].shape[0]
                y = snn.scatter_add(y, idx_m, dim_size=maxm)
                y = torch.squeeze(y, -1)
                if self.aggregation_mode == "avg":
                    y = y / inputs[props.n_atoms]
            inputs[self.output_key] = y
            return inputs

    return SymbolicAtomwise


def _triple_product(cell: torch.Tensor) -> torch.Tensor:
    """Signed volume per structure, [S] (the formula schnetpack's `Forces` uses)."""
    return torch.sum(cell[:, 0, :] * torch.cross(cell[:, 1, :], cell[:, 2, :], dim=1), dim=1)


def schnetpack_inputs(batch: AtomsBatch, positions: torch.Tensor, cell: torch.Tensor) -> Dict[str, torch.Tensor]:
    """SchNetPack's input dict (keys from `schnetpack.properties`) for our batch.

    Only shape-derived sizes are used, so this is traceable with symbolic N, E, S.
    """
    idx_i, idx_j = batch.edge_index[0], batch.edge_index[1]
    shifts = batch.shifts.to(batch.cell.dtype)
    # Cartesian offsets with the *unstrained* cell; schnetpack's Strain strains them.
    offsets = torch.einsum("ek,ekl->el", shifts, batch.cell[batch.batch[idx_i]])
    n_atoms = torch.zeros(batch.cell.shape[0], dtype=torch.long, device=batch.batch.device).index_add(
        0, batch.batch, torch.ones_like(batch.batch)
    )
    return {
        "_positions": positions,
        "_atomic_numbers": batch.numbers,
        "_idx_m": batch.batch,
        "_idx_i": idx_i,
        "_idx_j": idx_j,
        "_offsets": offsets,
        "_cell": cell,
        "_pbc": batch.pbc,
        "_n_atoms": n_atoms,
    }


class SchNetPackAdapter(nn.Module):
    """Runs a schnetpack `NeuralNetworkPotential` on an `AtomsBatch`.

    ``forward(batch) -> {"energy": [S], "forces": [N, 3], "stress": [S, 3, 3]}``
    (no ``"stress"`` when `compute_stress` is off). Energies, forces and stress are the
    wrapped model's own (autograd inside its `Forces` module); see the module docstring
    for what the adapter changes and why.
    """

    def __init__(self, model: nn.Module, compute_stress: bool = True, cutoff: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.compute_stress = bool(compute_stress)
        if cutoff is not None:
            self.cutoff = float(cutoff)

    def forward(self, batch: AtomsBatch) -> Dict[str, torch.Tensor]:
        positions = batch.positions.clone()
        if not positions.requires_grad:
            positions.requires_grad_(True)
        cell = batch.cell
        volume = _triple_product(cell)
        periodic = volume != 0
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        safe_cell = torch.where(periodic[:, None, None], cell, eye)

        inputs = schnetpack_inputs(batch, positions, safe_cell)
        with traceable_scatter():
            results = self.model(inputs)

        out = {"energy": results["energy"], "forces": results["forces"]}
        if self.compute_stress:
            # schnetpack: dE/dε / triple(safe_cell); make it dE/dε / |V|, 0 if V == 0.
            sign = torch.where(periodic, torch.sign(volume), torch.zeros_like(volume))
            out["stress"] = results["stress"] * sign[:, None, None]
        return out


def schnetpack_model(
    kind: str = "schnet",
    hidden: int = 32,
    num_interactions: int = 2,
    cutoff: float = 5.0,
    compute_stress: bool = True,
    n_rbf: int = 20,
    max_z: int = 100,
) -> SchNetPackAdapter:
    """A SchNetPack SchNet or PaiNN energy model with its own Forces/Strain modules.

    `kind`: ``"schnet"`` or ``"painn"``; `hidden`: atom feature width; the neighbour
    list must be built with the same `cutoff` (the cosine cutoff zeroes longer edges).
    Parameters are created in the default dtype; call ``.double()`` for float64.
    """
    import_schnetpack()
    import schnetpack.atomistic as atm
    import schnetpack.nn as snn
    from schnetpack.model import NeuralNetworkPotential
    from schnetpack.representation import PaiNN, SchNet

    radial = snn.GaussianRBF(n_rbf=n_rbf, cutoff=cutoff)
    cutoff_fn = snn.CosineCutoff(cutoff)
    kind = kind.lower()
    if kind == "schnet":
        representation = SchNet(
            n_atom_basis=hidden,
            n_interactions=num_interactions,
            radial_basis=radial,
            cutoff_fn=cutoff_fn,
            max_z=max_z,
        )
    elif kind == "painn":
        representation = PaiNN(
            n_atom_basis=hidden,
            n_interactions=num_interactions,
            radial_basis=radial,
            cutoff_fn=cutoff_fn,
            max_z=max_z,
        )
    else:
        raise ValueError(f"unknown schnetpack model kind {kind!r}: expected 'schnet' or 'painn'")

    input_modules = ([atm.Strain()] if compute_stress else []) + [atm.PairwiseDistances()]
    outputs = [
        _symbolic_atomwise_cls()(n_in=hidden, output_key="energy"),
        atm.Forces(calc_forces=True, calc_stress=compute_stress),
    ]
    model = NeuralNetworkPotential(
        representation=representation,
        input_modules=input_modules,
        output_modules=outputs,
        do_postprocessing=False,
    )
    return SchNetPackAdapter(model, compute_stress=compute_stress, cutoff=cutoff)
