"""Single-process compiled training: the loop behind ``januspipe demo`` and ``train``.

Each step runs the joint graph (the whole training step, captured once) and an
optimizer; checkpoints hold the *eager* model's state_dict, so they load back into
the original model with no JanusPipe installed.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .compiled import CompiledMLIP
from .data.batch import AtomsBatch

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    epoch: int
    loss: float
    energy_mae_per_atom: float  # eV/atom
    force_mae: float  # eV/Å
    structures_per_s: float


def make_batches(structures: Sequence, batch_size: int, cutoff: float, dtype: torch.dtype, seed: int) -> List[AtomsBatch]:
    """Shuffle once with `seed`, cut into batches of `batch_size` structures."""
    from .data import atoms_to_batch

    order = list(range(len(structures)))
    random.Random(seed).shuffle(order)
    return [
        atoms_to_batch([structures[i] for i in order[k : k + batch_size]], cutoff=cutoff, dtype=dtype)
        for k in range(0, len(order), batch_size)
    ]


def evaluate(compiled: CompiledMLIP, batches: Sequence[AtomsBatch]) -> Dict[str, float]:
    """Energy MAE per atom and force MAE over `batches` (through the compiled graph)."""
    e_err = f_err = 0.0
    n_struct = n_force = 0
    for batch in batches:
        out = compiled(batch)
        n_atoms = torch.bincount(batch.batch, minlength=batch.num_structures).to(out["energy"].dtype)
        e_err += ((out["energy"].detach() - batch.energy).abs() / n_atoms).sum().item()
        f_err += (out["forces"].detach() - batch.forces).abs().sum().item()
        n_struct += batch.num_structures
        n_force += batch.forces.numel()
    return {"energy_mae_per_atom": e_err / max(n_struct, 1), "force_mae": f_err / max(n_force, 1)}


def save_checkpoint(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Atomic write (temp file + rename): a crash never leaves a half-written checkpoint."""
    write_checkpoint(path, model.state_dict(), optimizer.state_dict(), epoch)


def write_checkpoint(path: os.PathLike, model_state: Dict[str, torch.Tensor], optimizer_state: dict, epoch: int) -> None:
    """The checkpoint format: the eager model's state_dict, the optimizer's, the epoch done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": dict(model_state), "optimizer": optimizer_state, "epoch": epoch}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Load a checkpoint into the eager model (and optimizer); returns the next epoch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1


def train(
    compiled: CompiledMLIP,
    batches: Sequence[AtomsBatch],
    epochs: int,
    lr: float = 1e-3,
    checkpoint: Optional[os.PathLike] = None,
    resume: bool = False,
    progress: bool = True,
) -> List[EpochStats]:
    """Train with Adam through the joint graph; one EpochStats per epoch."""
    import time

    from tqdm.auto import tqdm

    model = compiled.model
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start = load_checkpoint(checkpoint, model, optimizer)
        log.info("resumed from %s at epoch %d", checkpoint, start)
    history: List[EpochStats] = []
    n_structures = sum(b.num_structures for b in batches)
    for epoch in range(start, epochs):
        total, t0 = 0.0, time.perf_counter()
        # disable=None: bars only on a terminal, so logs and CI output stay clean
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=None if progress else True, leave=False)
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = compiled.train_step(batch)
            optimizer.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4g}")
        elapsed = time.perf_counter() - t0
        metrics = evaluate(compiled, batches)
        stats = EpochStats(epoch + 1, total / len(batches), metrics["energy_mae_per_atom"], metrics["force_mae"], n_structures / elapsed)
        history.append(stats)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, epoch)
    return history
