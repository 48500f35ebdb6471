"""A small, real, reproducible training set labelled by ASE's EMT potential.

EMT is cheap and ships with ASE, so tests, examples and benchmarks get genuine
energies / forces / stresses (not random numbers) without downloading anything.
Structures are fcc Cu, Al and random CuAl alloys: strained (so stress is non-trivial)
and either rattled or taken after a short Langevin MD run. Every structure k is built
from its own RNG seeded by (seed, k), so a data set is a prefix of any larger one with
the same seed. Results are cached as extxyz files keyed by every parameter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import ase
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase import units
from ase.md.langevin import Langevin

try:  # ASE >= 3.29 renamed it; same distribution and RNG use
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover - older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from .extxyz import read_extxyz, write_extxyz

log = logging.getLogger(__name__)

__all__ = ["emt_dataset", "large_structure", "default_cache_dir", "DATASETS"]

# Bump when the generator changes, so stale caches are not reused.
_GENERATOR_VERSION = 1
# data set name -> kinds of structure it cycles through ("CuAl" = random alloy).
DATASETS: dict[str, tuple[str, ...]] = {
    "cu-al": ("Cu", "Al", "CuAl"),
    "cu": ("Cu",),
    "al": ("Al",),
}
# Lattice constants close to EMT's own minima (Å), so unstrained cells are near zero stress.
_LATTICE = {"Cu": 3.59, "Al": 3.99, "Ni": 3.49, "Pd": 3.88, "Ag": 4.06, "Pt": 3.92, "Au": 4.06}


def default_cache_dir() -> Path:
    """$JANUSPIPE_CACHE, else ~/.cache/januspipe."""
    env = os.environ.get("JANUSPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "januspipe"


def _size_range(size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    lo, hi = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    lo, hi = int(lo), int(hi)
    if not 1 <= lo <= hi:
        raise ValueError(f"size must be an atom count or a (min, max) range with 1 <= min <= max, got {size!r}")
    return lo, hi


def _cell_choices(lo: int, hi: int) -> list[tuple[bool, tuple[int, int, int]]]:
    """(cubic?, repetitions) of fcc supercells with lo..hi atoms, not too elongated.

    Primitive (1-atom, 60° skewed) and conventional cubic (4-atom) cells are both
    used so the data has triclinic as well as orthorhombic boxes.
    """
    def enumerate_(max_ratio: float) -> list[tuple[bool, tuple[int, int, int]]]:
        found = []
        for cubic, per_cell in ((False, 1), (True, 4)):
            top = int(np.ceil(hi / per_cell)) + 1
            for a in range(1, top + 1):
                for b in range(1, a + 1):
                    for c in range(1, b + 1):
                        n = per_cell * a * b * c
                        if lo <= n <= hi and a / c <= max_ratio:
                            found.append((cubic, (a, b, c)))
        return found

    choices = enumerate_(2.0) or enumerate_(float("inf"))
    if not choices:
        raise ValueError(f"no fcc supercell has between {lo} and {hi} atoms; widen `size`")
    return choices


def _random_strain(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Symmetric small strain ε (cell -> cell @ (1 + ε))."""
    eps = rng.uniform(-amplitude, amplitude, size=(3, 3))
    return 0.5 * (eps + eps.T)


def _label(atoms: ase.Atoms) -> ase.Atoms:
    """Fresh Atoms (no velocities/constraints) with EMT energy, forces and stress."""
    out = ase.Atoms(
        numbers=atoms.numbers,
        # extxyz stores positions with 8 decimals: label exactly what will be stored.
        positions=np.round(atoms.positions, 8),
        cell=atoms.cell.array,
        pbc=atoms.pbc,
    )
    out.info.update({k: v for k, v in atoms.info.items() if k == "config_type"})
    out.calc = EMT()
    energy = out.get_potential_energy()
    forces = out.get_forces()
    stress = out.get_stress(voigt=True)
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces, stress=stress)
    return out


def _make_structure(kind: str, seed: int, k: int, lo: int, hi: int, md_fraction: float) -> ase.Atoms:
    rng = np.random.default_rng([seed, k])
    choices = _cell_choices(lo, hi)
    cubic, reps = choices[int(rng.integers(len(choices)))]
    if kind == "CuAl":
        x_al = rng.uniform(0.2, 0.8)
        a0 = (1 - x_al) * _LATTICE["Cu"] + x_al * _LATTICE["Al"]  # Vegard's law
        atoms = bulk("Cu", "fcc", a=a0, cubic=cubic) * reps
        is_al = rng.random(len(atoms)) < x_al
        if len(atoms) > 1:  # make it a real alloy
            is_al[0], is_al[1] = False, True
        atoms.numbers = np.where(is_al, 13, 29)
    else:
        atoms = bulk(kind, "fcc", a=_LATTICE[kind], cubic=cubic) * reps
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + _random_strain(rng, 0.03)), scale_atoms=True)

    if rng.random() < md_fraction:
        atoms.positions += rng.normal(0.0, 0.03, size=(len(atoms), 3))
        atoms.calc = EMT()
        temperature = float(rng.uniform(300.0, 1200.0))
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng)
        dyn.run(int(rng.integers(10, 31)))
        atoms.info["config_type"] = "md"
    else:
        atoms.positions += rng.normal(0.0, rng.uniform(0.02, 0.12), size=(len(atoms), 3))
        atoms.info["config_type"] = "rattle"
    atoms.wrap()
    return _label(atoms)


def _generate(name: str, num_structures: int, seed: int, lo: int, hi: int, md_fraction: float) -> list[ase.Atoms]:
    kinds = DATASETS[name]
    return [
        _make_structure(kinds[k % len(kinds)], seed, k, lo, hi, md_fraction)
        for k in range(num_structures)
    ]


def emt_dataset(
    name: str = "cu-al",
    num_structures: int = 64,
    seed: int = 0,
    size: Union[int, tuple[int, int]] = (8, 32),
    md_fraction: float = 0.25,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> list[ase.Atoms]:
    """EMT-labelled fcc structures (energy, forces, stress on a SinglePointCalculator).

    `name` picks the elements ("cu-al": Cu, Al and CuAl alloys in turn; "cu"; "al").
    `size` is an atom count or an inclusive (min, max) range of atoms per structure
    (8–64 is sensible). A fraction `md_fraction` of structures are snapshots after
    10–30 steps of Langevin MD at 300–1200 K; the rest are rattled. All are strained
    by up to ±3%. Deterministic for a given seed. The result is cached under
    `cache_dir` (default `default_cache_dir()`) and read back from there, so a first
    and a second call return identical data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown EMT data set {name!r}; choose one of {sorted(DATASETS)}")
    num_structures = int(num_structures)
    if num_structures < 1:
        raise ValueError(f"num_structures must be >= 1, got {num_structures}")
    if not 0.0 <= md_fraction <= 1.0:
        raise ValueError(f"md_fraction must be in [0, 1], got {md_fraction}")
    lo, hi = _size_range(size)
    params = {
        "name": name, "num_structures": num_structures, "seed": int(seed), "size": [lo, hi],
        "md_fraction": float(md_fraction), "version": _GENERATOR_VERSION, "ase": ase.__version__,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"emt-{name}-n{num_structures}-seed{seed}-{digest}.extxyz"

    if path.is_file():
        try:
            images = read_extxyz(path, require_labels=True)
            if len(images) == num_structures:
                log.info("EMT data set %s: read %d structures from cache %s", name, len(images), path)
                return images
            log.warning("cache file %s has %d structures, expected %d; regenerating", path, len(images), num_structures)
        except Exception as exc:  # corrupt or truncated cache: rebuild it
            log.warning("could not read cache file %s (%s); regenerating", path, exc)

    log.info("EMT data set %s: generating %d structures (seed %d, %d-%d atoms)", name, num_structures, seed, lo, hi)
    images = _generate(name, num_structures, int(seed), lo, hi, float(md_fraction))
    write_extxyz(path, images)
    return read_extxyz(path, require_labels=True)


def large_structure(
    n_atoms_approx: int = 2000,
    element: str = "Cu",
    seed: int = 0,
    rattle: float = 0.05,
    strain: float = 0.01,
) -> ase.Atoms:
    """A big rattled, slightly strained fcc supercell with EMT labels, for benchmarks.

    Uses the conventional 4-atom cubic cell repeated (a, b, c) times, near-cubic
    (a - c <= 1), picking the smallest such supercell with at least `n_atoms_approx`
    atoms, so ``large_structure(1000)`` has >= 1000 atoms (1008). EMT labelling costs
    about 1 s per 1000 atoms.
    """
    if element not in _LATTICE:
        raise ValueError(f"EMT has parameters for fcc {sorted(_LATTICE)}, not {element!r}")
    n_atoms_approx = int(n_atoms_approx)
    if n_atoms_approx < 1:
        raise ValueError(f"n_atoms_approx must be >= 1, got {n_atoms_approx}")
    base = int(np.ceil((n_atoms_approx / 4) ** (1 / 3)))
    candidates = [
        (4 * a * b * c, (a, b, c))
        for a in range(1, base + 2)
        for b in (a - 1, a)
        for c in (b - 1, b)
        if c >= 1 and a - c <= 1 and 4 * a * b * c >= n_atoms_approx
    ]
    reps = min(candidates)[1]
    rng = np.random.default_rng([seed, n_atoms_approx])
    atoms = bulk(element, "fcc", a=_LATTICE[element], cubic=True) * reps
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + _random_strain(rng, strain)), scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, size=(len(atoms), 3))
    atoms.wrap()
    atoms.info["config_type"] = "large"
    log.info("large_structure: %s with %d atoms (repetitions %s)", element, len(atoms), reps)
    return _label(atoms)
