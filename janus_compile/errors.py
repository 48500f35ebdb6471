"""Errors a user can act on: each names the cause and the fix."""
from __future__ import annotations


class JanusError(Exception):
    """Base class of every error JanusPipe raises on purpose."""


class CaptureError(JanusError):
    """The model could not be captured as an explicit force graph."""


class NotConservativeError(CaptureError):
    """The energy does not depend on the positions, so forces are not -dE/dR."""


class DataDependentControlFlowError(CaptureError):
    """The model branches on tensor values, which a symbolic graph cannot represent."""


class NoDoubleBackwardError(CaptureError):
    """An op in the force graph has no derivative formula, so force training is impossible."""


class ScriptedModuleError(CaptureError):
    """A TorchScript submodule cannot be traced symbolically."""
