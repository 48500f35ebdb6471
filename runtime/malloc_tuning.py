"""Keep glibc from handing a CPU worker's tensor memory back to the kernel every step.

A training step on CPU allocates and frees the same large tensors again and again. With
glibc's defaults a block over the mmap threshold (128 KiB at start, raised by glibc's
own heuristic up to 32 MiB once such blocks are freed) is a fresh ``mmap``, and freed
memory at the top of the heap beyond the trim threshold is returned to the kernel. Either
way the next step touches new pages, and the kernel faults and zeroes every one of them.
On PaiNN's 1008-atom split graphs (one thread) that is the difference between 0.78 s per
micro-batch with the thresholds below and 0.89 s with glibc's heuristic, and 1.53 s with
``MALLOC_MMAP_THRESHOLD_=1048576`` (more kernel time than compute); two workers faulting
at once on one machine slow each other further.

So each worker, before it runs anything, fixes the mmap threshold at glibc's largest
(32 MiB: larger tensors still come from ``mmap``) and turns trimming off. The resident
memory then stays at the step's peak between steps instead of dropping and faulting back
in: the peak itself is the same, since every step reaches it. (A trim threshold of
1 GiB, tried first, can still hand the heap back after every step on a rank whose step
peaks above it, as 1F1B's and WaveK's did at 4 in flight in the PaiNN bench.) A user who
sets any of glibc's ``MALLOC_*_`` variables keeps their settings (we change nothing), and
on other C libraries this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: the largest it accepts
TRIM_THRESHOLD_NEVER = -1  # mallopt(3): -1 disables trimming altogether
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_malloc_for_tensors() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring).

    Returns True if they were set; False where the user set glibc's variables, where the C
    library is not glibc, or where ``mallopt`` refused (each logged at debug level).
    """
    user = [v for v in USER_VARIABLES if v in os.environ]
    if user:
        log.debug("malloc left as configured by %s", ", ".join(user))
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here: malloc left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_NEVER) == 1
    if not ok:
        log.debug("mallopt refused the thresholds: malloc left as it is")
    return ok
