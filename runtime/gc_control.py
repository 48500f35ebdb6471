"""Python's cyclic garbage collector kept out of the timed pipeline steps.

Left alone, the collector runs whenever allocation counts cross its thresholds: in the
middle of some step on some rank, and a full collection walks every tracked object the
worker holds (the unpickled FX graphs and their nodes, the programs, the batches). The
whole pipeline then waits for that rank. As torchtitan's ``GarbageCollection`` does, a
training loop freezes what its setup built (`gc.freeze`: never walked again), turns
automatic collection off, and collects between steps, outside the timed window, where
only the objects the last step created are walked.
"""

from __future__ import annotations

import gc
import logging
from types import TracebackType
from typing import Optional, Type

logger = logging.getLogger(__name__)


class StepGarbageCollection:
    """Context manager for a training loop: no automatic collection inside it.

    Call `between_steps` where no step is timed. On exit the collector's state from
    before is restored and the frozen objects are handed back to it, so a process that
    goes on (a torchrun rank, a notebook) is left as it was.
    """

    def __init__(self) -> None:
        self._was_enabled = gc.isenabled()
        self.collections = 0

    def __enter__(self) -> "StepGarbageCollection":
        gc.collect()
        gc.freeze()
        gc.disable()
        logger.debug("garbage collector: %d objects frozen, automatic collection off", gc.get_freeze_count())
        return self

    def between_steps(self) -> None:
        """A full collection of what is not frozen: the objects made since the last one."""
        gc.collect()
        self.collections += 1

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
