"""JanusPipe: pipeline-parallel training of conservative MLIPs as a torch.compile backend.

``torch.compile(model, backend="januspipe")`` works once this package is installed (entry
point) or imported; `compile` captures a model without Dynamo.
"""
from .backend import januspipe_backend, register as _register_backend
from .compiled import CompiledMLIP, compile
from .data.batch import AtomsBatch, BatchError
from .errors import (
    CaptureError,
    DataDependentControlFlowError,
    JanusError,
    NoDoubleBackwardError,
    NotConservativeError,
    ScriptedModuleError,
)
from .losses import EnergyForceLoss
from .options import JanusOptions, OptionsError

_register_backend()

__version__ = "0.1.0"
__all__ = [
    "AtomsBatch",
    "BatchError",
    "CaptureError",
    "CompiledMLIP",
    "DataDependentControlFlowError",
    "EnergyForceLoss",
    "JanusError",
    "JanusOptions",
    "NoDoubleBackwardError",
    "NotConservativeError",
    "OptionsError",
    "ScriptedModuleError",
    "compile",
    "januspipe_backend",
]
