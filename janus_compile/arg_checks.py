"""Checks shared by the benchmark and calibration commands: a bad device or output path
fails before minutes of work, naming the flag and the fix."""
from __future__ import annotations

import os
from typing import Optional

import torch


def check_device(device: str) -> None:
    """``device`` names a torch device this host has (cpu, cuda, cuda:N)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N (--device)") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda are supported (--device)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")


def check_output_folder(path: Optional[str], flag: str) -> None:
    """The folder ``path`` will be written into exists (checked before the work, not after)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it first")
