"""Retarget a captured graph to another device.

Tracing records the device of every tensor a graph creates itself (``zeros``,
``new_zeros``, ``scalar_tensor``, ``arange``, ... carry ``device=cpu`` in their kwargs) and
keeps tensor constants it closed over (``get_attr``) where they were. A graph captured
in one place and run in another, a pipeline worker on its own GPU, must create those
tensors on its own device, or the first op mixing them with its inputs fails. This pass
rewrites both: every ``device`` keyword of a node, and every tensor constant.
"""
from __future__ import annotations

import logging
from typing import Union

import torch
import torch.fx as fx

log = logging.getLogger(__name__)


def _is_device(value: object) -> bool:
    return isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda", "meta"))


def retarget_devices(gm: fx.GraphModule, device: Union[str, torch.device]) -> fx.GraphModule:
    """A copy of ``gm`` that creates its tensors on ``device`` and holds its constants there."""
    device = torch.device(device)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    moved = 0
    for node in graph.nodes:
        if "device" in node.kwargs and _is_device(node.kwargs["device"]):
            node.kwargs = {**node.kwargs, "device": device}
            moved += 1
    out = fx.GraphModule(gm, graph)
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, name = node.target.rpartition(".")
        module = out.get_submodule(owner) if owner else out
        value = getattr(module, name)
        if not isinstance(value, torch.Tensor) or value.device == device:
            continue
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(value.detach().to(device), requires_grad=value.requires_grad)
        elif name in module._buffers:
            module._buffers[name] = value.to(device)
        else:
            setattr(module, name, value.to(device))
        moved += 1
    log.debug("retargeted %d device arguments and constants to %s", moved, device)
    return out
