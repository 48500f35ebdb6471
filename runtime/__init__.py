"""Distributed runtime (programs, executor, mesh, launch); see docs/runtime.md.

Importing it registers ``torch.ops.januspipe.gp_all_reduce``, which graph-parallel stage
graphs call, so that a worker can unpickle them.
"""
from . import collectives  # noqa: F401  (registers the januspipe ops)
