"""JanusPipe: pipeline-parallel training of conservative MLIPs as a torch.compile backend.

``torch.compile(model, backend="januspipe")`` works once this package is installed (entry
point) or imported; `compile` captures a model without Dynamo.

The public names load on first use (PEP 562), so that ``januspipe --help`` and the
command line's argument errors do not wait for ``torch._dynamo``. Where the package is
not installed (no entry point), importing it registers the backend at once, as before.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY_NAMES = {
    "januspipe_backend": "backend",
    "CompiledMLIP": "compiled",
    "compile": "compiled",
    "AtomsBatch": "data.batch",
    "BatchError": "data.batch",
    "CaptureError": "errors",
    "DataDependentControlFlowError": "errors",
    "JanusError": "errors",
    "NoDoubleBackwardError": "errors",
    "NotConservativeError": "errors",
    "ScriptedModuleError": "errors",
    "EnergyForceLoss": "losses",
    "JanusOptions": "options",
    "OptionsError": "options",
}
__all__ = sorted(_LAZY_NAMES)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY_NAMES))


def entry_point_installed() -> bool:
    """Whether torch can find the backend through this package's installed entry point."""
    return any(ep.name == "januspipe" for ep in entry_points(group="torch_dynamo_backends"))


if not entry_point_installed():
    # torch finds an installed backend through its entry point; a source checkout
    # on sys.path has none, so it registers here (importing torch._dynamo).
    from .backend import register as _register_backend

    _register_backend()
