"""Reference conservative MLIPs used by the demo, the tests and the benchmarks."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .conservative import ConservativeModel, edge_vectors
from .nequip import NequIP
from .painn import PaiNN
from .schnet import SchNet

# name -> constructor; extend with `MODEL_REGISTRY["name"] = cls` (or `register_model`).
MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "schnet": SchNet,
    "painn": PaiNN,
    "nequip": NequIP,
}


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
    """Add a model constructor under `name` (case-insensitive)."""
    MODEL_REGISTRY[name.lower()] = constructor


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``build_model("schnet", hidden=32)``."""
    key = name.lower()
    if key not in MODEL_REGISTRY:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return MODEL_REGISTRY[key](**kwargs)


__all__ = [
    "ConservativeModel",
    "edge_vectors",
    "SchNet",
    "PaiNN",
    "NequIP",
    "MODEL_REGISTRY",
    "register_model",
    "build_model",
]
