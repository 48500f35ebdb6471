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
from .passes.rebalance import measured_rank_times

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


def graph_as_chunk_dot(graph: fx.Graph, chunk_of: dict, name: str = "partition") -> str:
    """Graphviz source of a partitioned graph: colour = phase, cluster = chunk."""
    clusters: dict = {}
    for n in graph.nodes:
        clusters.setdefault(chunk_of.get(n.name, "inputs"), []).append(n)
    out = [f'digraph "{name}" {{', "  rankdir=TB; node [shape=box, style=filled, fontsize=9];"]
    for key in sorted(clusters, key=lambda k: (isinstance(k, str), k)):
        label = f"chunk {key}" if not isinstance(key, str) else key
        out.append(f'  subgraph "cluster_{key}" {{ label="{label}"; color="#999999";')
        for n in clusters[key]:
            phase = n.meta.get(PHASE) if n.op == "call_function" else None
            out.append(f'    "{n.name}" [label="{n.name}", fillcolor="{PHASE_COLOURS.get(phase, "#e0e0e0")}"];')
        out.append("  }")
    for n in graph.nodes:
        for src in n.all_input_nodes:
            out.append(f'  "{src.name}" -> "{n.name}";')
    out.append("}")
    return "\n".join(out) + "\n"


def partition_report(partition) -> dict:
    """Everything a user needs to judge a partition, as JSON-able data."""
    sol = partition.solution
    return {
        "method": partition.method,
        "stages": partition.stages,
        "chunks_per_stage": partition.chunks,
        "units": partition.units.names,
        "unit_depth": partition.units.depth,
        "chunk_of_unit": partition.chunk_of_unit,
        "unit_order": partition.problem.order if partition.method == "symfold" else None,
        # how the ILP charged a cut edge: per chunk crossed, or once (docs/partitioning.md)
        "transfer_charge": partition.problem.transfer_charge if partition.method == "symfold" else None,
        "rank_time_s": partition.rank_times(),
        "max_over_mean_rank_time": partition.imbalance(),
        "rank_memory_bytes": partition.rank_memory(),
        "nodes_moved_off_fold_chunk": partition.plan.placement.moved,
        "nodes_moved_to_later_phase": partition.plan.placement.rephased,
        "replicated_on_readers": partition.replicas,
        "ilp": None
        if sol is None
        else {
            "status": sol.status,
            "objective": sol.objective,
            "bound": sol.bound,
            "gap": sol.gap,
            "solve_seconds": sol.solve_seconds,
            "variables": getattr(sol, "num_variables", None),
            "constraints": getattr(sol, "num_constraints", None),
        },
        "chunks": partition.table(),
        # each split graph timed on the example micro-batch: the schedule's costs
        "group_times_s": [
            {"chunk": c, "group": g, "seconds": t} for (c, g), t in sorted(partition.group_times.items())
        ],
        # per rank, summed over the timed groups; and those of the split a rebalance replaced
        "measured_rank_times_s": measured_rank_times(partition),
        "rebalanced_from_rank_times_s": list(partition.rebalanced_from),
    }


def partition_markdown(report: dict) -> str:
    lines = [
        f"# {report['method']} partition: P={report['stages']}, K={report['chunks_per_stage']}",
        "",
        f"max/mean rank time: {report['max_over_mean_rank_time']:.3f}",
    ]
    if report["ilp"]:
        ilp = report["ilp"]
        lines.append(f"ILP: {ilp['status']}, objective {ilp['objective']:.6g}, bound {ilp['bound']}, gap {ilp['gap']}, {ilp['solve_seconds']:.2f} s")
    if report.get("unit_order") == "dag":
        lines.append("unit order: data flow (units placed out of their topological order where that balances better)")
    if report.get("transfer_charge") == "once":
        lines.append("transfers charged once per cut edge, not per chunk crossed (`transfer_charge`; by default where the per-chunk charge missed the balance target)")
    lines += ["", "| chunk | rank | units | F ms | G ms | GG ms | FB ms | boundary tensors received |", "|---|---|---|---|---|---|---|---|"]
    for row in report["chunks"]:
        s = row["seconds"]
        recv = ", ".join(f"{k} {v['shape']} ({v['bytes'] / 1e3:.1f} kB)" for k, v in row["received"].items())
        lines.append(
            f"| {row['chunk']} | {row['rank']} | {', '.join(row['units'])} | "
            + " | ".join(f"{1e3 * s[p]:.3f}" for p in ("F", "G", "GG", "FB"))
            + f" | {recv} |"
        )
    if report.get("replicated_on_readers"):
        lines += ["", "Data-only values recomputed on the chunks that read them instead of being sent (`replicate`):", ""]
        lines += [f"- {name}: chunks {', '.join(map(str, chunks))}" for name, chunks in sorted(report["replicated_on_readers"].items())]
    lines += ["", "| rank | parameters+optimizer (MB) | stash per micro-batch (MB) |", "|---|---|---|"]
    for r, mem in enumerate(report["rank_memory_bytes"]):
        lines.append(f"| {r} | {mem['params'] / 1e6:.3f} | {mem['stash_per_microbatch'] / 1e6:.3f} |")
    if report.get("group_times_s"):
        lines += [
            "", "Each split graph run on the example micro-batch (the schedule's costs; the chunk table above sums "
            "calibrated node times):", "", "| chunk | group | measured ms |", "|---|---|---|",
        ]
        lines += [f"| {row['chunk']} | {row['group']} | {1e3 * row['seconds']:.3f} |" for row in report["group_times_s"]]
        lines += ["", "measured ms per rank: " + ", ".join(f"{1e3 * t:.3f}" for t in report.get("measured_rank_times_s", []))]
    if report.get("rebalanced_from_rank_times_s"):
        lines += [
            "", "Solved again on node times corrected by the measured groups (`rebalance`); the first split measured "
            + ", ".join(f"{1e3 * t:.3f}" for t in report["rebalanced_from_rank_times_s"]) + " ms per rank.",
        ]
    return "\n".join(lines) + "\n"


def dump_partition(dump_dir: Union[str, os.PathLike], partition, joint_graph=None) -> Path:
    """partition.json / partition.md, the ILP as symfold.lp, one file per split graph, the chunk .dot."""
    root = Path(dump_dir)
    (root / "split").mkdir(parents=True, exist_ok=True)
    for stale in (root / "split").glob("chunk*_*.py"):  # a partition written earlier (another K)
        stale.unlink()
    report = partition_report(partition)
    _write(root / "partition.json", json.dumps(report, indent=2, default=str))
    _write(root / "partition.md", partition_markdown(report))
    if partition.solution is not None and partition.solution.lp_text:
        _write(root / "symfold.lp", partition.solution.lp_text)
    for (chunk, phase), group in sorted(partition.plan.groups.items()):
        header = f"# chunk {chunk}, phase {phase}\n# inputs: {group.inputs}\n# outputs: {group.outputs}\n"
        _write(root / "split" / f"chunk{chunk:02d}_{phase}.py", header + graph_as_code(group.gm.graph))
    if joint_graph is not None:
        _write(root / "partition.dot", graph_as_chunk_dot(joint_graph.gm.graph, partition.plan.placement.chunk))
        render_svg(root / "partition.dot")
    log.info("wrote partition dumps to %s", root)
    return root


def dump_graph_parallel(dump_dir: Union[str, os.PathLike], report, graph_parallel: int) -> Path:
    """graph_parallel.md: the all-reduces the gp pass inserted, per phase, with their bytes."""
    path = Path(dump_dir) / "graph_parallel.md"
    text = (
        f"# Graph parallelism (gp = {graph_parallel})\n\n"
        f"{report.sharded_nodes} per-edge nodes run on 1/{graph_parallel} of the edges on every gp rank; "
        f"{sum(report.all_reduces.values())} sum all-reduces restore the per-atom, per-structure and "
        f"parameter-gradient values ({report.rewritten_accumulations} accumulations rewritten so that "
        "their destination is counted once).\n\n"
        + report.table()
        + "\n"
    )
    _write(path, text)
    return path
