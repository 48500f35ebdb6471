"""Inspection dumps: the captured graphs as labelled code, graphviz and a summary.

Written to ``dump_dir`` (or env ``JANUSPIPE_DUMP``):

- ``force_graph.py`` / ``joint_graph.py``: one line per node with its phase, module and
  the forward node it differentiates;
- ``joint_graph.dot`` (+ ``.svg`` when graphviz's ``dot`` is installed): nodes coloured
  by phase, clustered by module;
- ``summary.json``: node counts per phase and per module, inputs, outputs, symbolic sizes
  and the size guards.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Union

import torch.fx as fx

from .passes.labels import FORWARD_NODE, IS_LOSS, MODULE, PHASE, module_phase_counts, phase_counts

log = logging.getLogger(__name__)

PHASE_COLOURS = {"F": "#8ecae6", "G": "#ffb703", "GG": "#fb8500", "FB": "#219ebc", None: "#e0e0e0"}


def graph_as_code(graph: fx.Graph) -> str:
    """Readable code, one node a line, labels as trailing comments."""
    lines = []
    for n in graph.nodes:
        text = n.format_node() or n.name
        if n.op == "call_function":
            tags = [f"phase={n.meta.get(PHASE)}", f"module={n.meta.get(MODULE) or '<root>'}"]
            if n.meta.get(FORWARD_NODE):
                tags.append(f"fwd={n.meta[FORWARD_NODE]}")
            if n.meta.get(IS_LOSS):
                tags.append("loss")
            val = n.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None:
                tags.append("shape=" + str(tuple(shape)).replace(" ", ""))
            text = f"{text}  # {' '.join(tags)}"
        lines.append(text)
    return "\n".join(lines) + "\n"


def graph_as_dot(graph: fx.Graph, name: str = "joint") -> str:
    """Graphviz source: colour = phase, cluster = module."""
    clusters: dict = {}
    for n in graph.nodes:
        clusters.setdefault(n.meta.get(MODULE, "") if n.op == "call_function" else "<io>", []).append(n)
    out = [f'digraph "{name}" {{', "  rankdir=TB; node [shape=box, style=filled, fontsize=9];"]
    for k, (module, nodes) in enumerate(sorted(clusters.items())):
        out.append(f'  subgraph "cluster_{k}" {{ label="{module or "<root>"}"; color="#999999";')
        for n in nodes:
            phase = n.meta.get(PHASE) if n.op == "call_function" else None
            label = f"{n.name}\\n{getattr(n.target, '__name__', str(n.target))}"
            out.append(f'    "{n.name}" [label="{label}", fillcolor="{PHASE_COLOURS.get(phase, "#e0e0e0")}"];')
        out.append("  }")
    for n in graph.nodes:
        for src in n.all_input_nodes:
            out.append(f'  "{src.name}" -> "{n.name}";')
    legend = " ".join(f'"{p}" [fillcolor="{c}"];' for p, c in PHASE_COLOURS.items() if p)
    out.append(f'  subgraph "cluster_legend" {{ label="phase"; {legend} }}')
    out.append("}")
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_svg(dot_path: Path, timeout: float = 120.0) -> Optional[Path]:
    """Render with graphviz's ``dot`` if it is installed; skip quietly otherwise."""
    exe = shutil.which("dot")
    if exe is None:
        log.info("graphviz 'dot' not found: wrote %s only (install graphviz for the .svg)", dot_path)
        return None
    svg = dot_path.with_suffix(".svg")
    try:
        subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(svg)], check=True, timeout=timeout, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("dot failed on %s: %s", dot_path, exc)
        return None
    return svg


def summary(force_graph, joint_graph=None) -> dict:
    data = {
        "force_graph": {
            "nodes_per_phase": phase_counts(force_graph.gm.graph),
            "nodes_per_module": module_phase_counts(force_graph.gm.graph),
            "inputs": {"params": force_graph.param_names, "buffers": force_graph.buffer_names, "batch": force_graph.batch_fields},
            "outputs": force_graph.output_names,
            "sizes": {k: str(v) for k, v in force_graph.guards.symbols.items()},
            "size_guards": [str(g) for g in force_graph.guards.guards],
        }
    }
    if joint_graph is not None:
        data["joint_graph"] = {
            "nodes_per_phase": phase_counts(joint_graph.gm.graph),
            "nodes_per_module": module_phase_counts(joint_graph.gm.graph),
            "targets": joint_graph.target_fields,
            "outputs": ["loss"] + joint_graph.output_names + [f"grad_{p}" for p in joint_graph.param_names],
            "sizes": {k: str(v) for k, v in joint_graph.guards.symbols.items()},
            "size_guards": [str(g) for g in joint_graph.guards.guards],
        }
    return data


def dump_graphs(dump_dir: Union[str, os.PathLike], force_graph, joint_graph=None) -> Path:
    """Write every artefact of the capture and joint passes; returns the directory."""
    root = Path(dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "force_graph.py", graph_as_code(force_graph.gm.graph))
    _write(root / "force_graph.dot", graph_as_dot(force_graph.gm.graph, "force"))
    if joint_graph is not None:
        _write(root / "joint_graph.py", graph_as_code(joint_graph.gm.graph))
        _write(root / "joint_graph.dot", graph_as_dot(joint_graph.gm.graph, "joint"))
        render_svg(root / "joint_graph.dot")
    else:
        render_svg(root / "force_graph.dot")
    _write(root / "summary.json", json.dumps(summary(force_graph, joint_graph), indent=2))
    log.info("wrote capture dumps to %s", root)
    return root
