"""Extended-XYZ reading and writing with reference labels kept.

ASE (3.23+) moves ``energy``/``forces``/``stress`` found in an extxyz file into a
`SinglePointCalculator` on read, so ``atoms.get_potential_energy()`` etc. return them
and `collate.read_labels` finds them. On write, ASE refuses a structure that carries
the same label both in ``atoms.info``/``atoms.arrays`` and in its calculator, and
writes only what a calculator has already computed; `write_extxyz` normalises every
structure to a SinglePointCalculator first so labels always land in the file once.

Precision: ASE writes per-atom columns (positions, forces) with 8 decimals, so they
round-trip to ~1e-8; energy, stress and the cell are written at full precision.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

import ase
import ase.io
import numpy as np
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator

try:
    from ase.stress import full_3x3_to_voigt_6_stress
except ImportError:  # pragma: no cover - ASE < 3.23 kept it in ase.constraints
    from ase.constraints import full_3x3_to_voigt_6_stress

from .collate import _as_full_stress, read_labels

log = logging.getLogger(__name__)

__all__ = ["read_extxyz", "write_extxyz"]

PathLike = Union[str, os.PathLike]


def _attach_labels(atoms: ase.Atoms, labels: dict[str, np.ndarray], extra: Optional[dict] = None) -> None:
    """Put labels on `atoms` as a SinglePointCalculator (stress as ASE's Voigt 6-vector)."""
    results = dict(extra or {})
    if "energy" in labels:
        results["energy"] = float(labels["energy"])
    if "forces" in labels:
        results["forces"] = np.asarray(labels["forces"], dtype=np.float64)
    if "stress" in labels:
        results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(labels["stress"], dtype=np.float64))
    atoms.calc = SinglePointCalculator(atoms, **results) if results else None


def read_extxyz(
    path: PathLike,
    index: Union[str, int, slice] = ":",
    require_labels: bool = False,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
) -> list[ase.Atoms]:
    """Read structures (always a list) with their labels on a SinglePointCalculator.

    Labels stored under other names (e.g. ``REF_energy``/``REF_forces``) are moved to
    the calculator when named through `energy_key`/`forces_key`/`stress_key`. With
    `require_labels`, every structure must have an energy and forces, else ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"extxyz file {str(path)!r} does not exist (resolved: {path.resolve()})")
    try:
        images = ase.io.read(path, index=index, format="extxyz")
    except Exception as exc:  # ASE raises XYZError, ValueError, IndexError, ... on a malformed file
        raise ValueError(
            f"extxyz file {str(path)!r} could not be read as extended XYZ ({type(exc).__name__}: {exc}); "
            "check that it is an extxyz file (an atom count line, a comment line with Lattice=/Properties=, "
            "then one line per atom)"
        ) from exc
    if isinstance(images, ase.Atoms):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError(f"extxyz file {str(path)!r} has no structures (index={index!r})")

    custom = (energy_key, forces_key, stress_key) != ("energy", "forces", "stress")
    for atoms in images:
        if not custom:
            continue
        labels = read_labels(atoms, compute=False)
        if energy_key in atoms.info:
            labels["energy"] = np.asarray(atoms.info.pop(energy_key), dtype=np.float64)
        if forces_key in atoms.arrays:
            labels["forces"] = np.asarray(atoms.arrays.pop(forces_key), dtype=np.float64)
        if stress_key in atoms.info:
            labels["stress"] = _as_full_stress(atoms.info.pop(stress_key))
        _attach_labels(atoms, labels)

    if require_labels:
        bad = []
        for k, atoms in enumerate(images):
            have = read_labels(atoms, compute=False)
            lacking = [n for n in ("energy", "forces") if n not in have]
            if lacking:
                bad.append((k, lacking, sorted(atoms.info), sorted(set(atoms.arrays) - {"numbers", "positions"})))
        if bad:
            k, lacking, info_keys, array_keys = bad[0]
            raise ValueError(
                f"{len(bad)} of {len(images)} structures in {str(path)!r} lack reference "
                f"labels; structure {k} has no {lacking} (its info keys: {info_keys}, "
                f"per-atom arrays: {array_keys}). If the labels are stored under other "
                "names, pass energy_key=/forces_key=/stress_key= (e.g. 'REF_energy'; on the "
                "command line --energy-key/--forces-key/--stress-key); "
                "otherwise label the data first or read with require_labels=False"
            )
    log.info("read %d structures from %s", len(images), path)
    return images


def write_extxyz(path: PathLike, atoms_list: Union[ase.Atoms, Iterable[ase.Atoms]]) -> Path:
    """Write structures with their labels (energy, forces, stress) to `path`, atomically.

    Labels come from each structure's calculator results (never computed here) or
    ``info``/``arrays``. The file is written to a temporary file in the same directory
    and moved into place, so readers never see a half-written file.
    """
    if isinstance(atoms_list, ase.Atoms):
        atoms_list = [atoms_list]
    out = []
    for atoms in atoms_list:
        labels = read_labels(atoms, compute=False)
        extra = {}
        if atoms.calc is not None and not atoms.calc.check_state(atoms):
            extra = {
                k: v for k, v in atoms.calc.results.items()
                if k in all_properties and k not in ("energy", "forces", "stress")
            }
        copy = atoms.copy()  # drops the calculator
        copy.info.pop("energy", None)
        copy.info.pop("stress", None)
        if "forces" in copy.arrays:
            del copy.arrays["forces"]
        _attach_labels(copy, labels, extra)
        out.append(copy)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            ase.io.write(fh, out, format="extxyz")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache should be readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("wrote %d structures to %s", len(out), path)
    return path
