"""Workers keep their tensor memory in glibc's heap instead of mmap-ing it afresh.

Where a block comes from is observable: glibc's heap lies below the program break
(``sbrk(0)``), an ``mmap``-ed block above it. A fresh process puts an 8 MiB tensor in a
new mapping (glibc's mmap threshold starts at 128 KiB); once tuned, in the heap.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from janus_compile.runtime.launch import launch_local

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys, torch
    from janus_compile.runtime.malloc_tuning import tune_malloc_for_tensors
    applied = tune_malloc_for_tensors() if sys.argv[1] == "tune" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
    t = torch.empty(2 << 20)  # 8 MiB
    print(json.dumps({"applied": applied, "in_heap": t.data_ptr() < libc.sbrk(0)}))
    """
)


def _fresh_process(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tensor_in_heap(rank: int, world_size: int) -> bool:
    import ctypes

    import torch

    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
    return torch.empty(2 << 20).data_ptr() < libc.sbrk(0)


def test_untuned_process_maps_a_large_tensor_afresh():
    assert _fresh_process("none") == {"applied": None, "in_heap": False}


def test_tuned_process_keeps_a_large_tensor_in_the_heap():
    assert _fresh_process("tune") == {"applied": True, "in_heap": True}


def test_users_malloc_variables_are_left_alone():
    assert _fresh_process("tune", MALLOC_MMAP_THRESHOLD_="1048576") == {"applied": False, "in_heap": False}


def test_pipeline_workers_are_tuned(monkeypatch):
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert launch_local(_tensor_in_heap, 2, timeout_s=60) == [True, True]
