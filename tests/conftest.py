"""Shared test helpers: random labelled structures and exact comparisons with eager."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from ase import Atoms

from janus_compile.data import atoms_to_batch

CUTOFF = 3.5


def random_structures(seed: int, n_structures: int, atoms_range=(3, 9), periodic: bool = True):
    """Random periodic (or molecular) structures with random labels, for exactness tests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_structures):
        n = int(rng.integers(atoms_range[0], atoms_range[1] + 1))
        if periodic:
            cell = np.diag(rng.uniform(3.5, 5.0, size=3)) + rng.uniform(-0.4, 0.4, size=(3, 3))
            frac = rng.uniform(size=(n, 3))
            atoms = Atoms(numbers=rng.integers(1, 30, size=n), scaled_positions=frac, cell=cell, pbc=True)
        else:
            atoms = Atoms(numbers=rng.integers(1, 30, size=n), positions=rng.uniform(0, 3.0, size=(n, 3)))
        atoms.info["energy"] = float(rng.normal())
        atoms.arrays["forces"] = rng.normal(size=(n, 3))
        atoms.info["stress"] = rng.normal(size=6) * 0.01
        out.append(atoms)
    return out


def random_batch(seed: int, n_structures: int = 3, dtype=torch.float64, **kw):
    return atoms_to_batch(random_structures(seed, n_structures, **kw), cutoff=CUTOFF, dtype=dtype)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """max |a - e| <= rel * max |e| (a relative error on the tensor's scale)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-300), f"{what}: max abs error {err:.3e} > {rel:g} x scale {scale:.3e}"


# Test graphs are tiny: one thread avoids oversubscribing the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JANUSPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JANUSPIPE_DUMP", raising=False)


def eager_adam_losses(model, batches, epochs: int, loss_fn, lr: float = 1e-3):
    """Loss of every step of plain eager Adam training: the curve a distributed run must follow."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        for b in batches:
            opt.zero_grad()
            loss = loss_fn(model(b), b)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


class SlowGroup(torch.nn.Module):
    """A split group graph that takes ``delay`` seconds longer: a stand-in for a costly
    group in the real group timing (not picklable to workers: timing tests only)."""

    def __init__(self, gm, delay: float) -> None:
        super().__init__()
        self.gm, self.delay = gm, delay

    def forward(self, *args):
        time.sleep(self.delay)
        return self.gm(*args)


class PidLoggingGroup(torch.nn.Module):
    """A split group graph that appends the calling process's id to ``path`` (picklable:
    a spawned process imports it from this module); with ``fail_elsewhere`` it raises in
    any process but ``owner`` once it has run ``fail_after`` times there; ``owner_delay``
    seconds are slept in ``owner``. Shows which processes ran a group."""

    def __init__(
        self, gm, path: str, owner: int, fail_elsewhere: bool = False, fail_after: int = 0, owner_delay: float = 0.0
    ) -> None:
        super().__init__()
        self.gm, self.path, self.owner, self.fail_elsewhere = gm, path, owner, fail_elsewhere
        self.fail_after, self.owner_delay, self.calls = fail_after, owner_delay, 0

    def forward(self, *args):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if os.getpid() == self.owner:
            time.sleep(self.owner_delay)
        elif self.fail_elsewhere:
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError("this group fails outside its owner process")
        return self.gm(*args)
