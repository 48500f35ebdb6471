"""Data pipeline: ASE structures -> neighbour lists -> `AtomsBatch` graph batches.

Also reading/writing labelled extxyz files and a built-in EMT-labelled data set.
"""
from __future__ import annotations

from .batch import NORMALIZER_FIELDS, REQUIRED_FIELDS, TARGET_FIELDS, TENSOR_FIELDS, AtomsBatch, BatchError
from .collate import atoms_to_batch, concat_batches, split_microbatches
from .emt import emt_dataset, large_structure
from .extxyz import read_extxyz, write_extxyz
from .neighbors import neighbor_list

__all__ = [
    "AtomsBatch",
    "BatchError",
    "REQUIRED_FIELDS",
    "TARGET_FIELDS",
    "TENSOR_FIELDS",
    "NORMALIZER_FIELDS",
    "neighbor_list",
    "atoms_to_batch",
    "split_microbatches",
    "concat_batches",
    "read_extxyz",
    "write_extxyz",
    "emt_dataset",
    "large_structure",
]
