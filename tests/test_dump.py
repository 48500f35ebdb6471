"""Inspection dumps: labelled code, graphviz and a summary that match the graphs."""
from __future__ import annotations

import json
import shutil

import torch
from conftest import random_batch

import janus_compile
from janus_compile.models import build_model
from janus_compile.passes.labels import PHASES, phase_counts


def _compiled(dump_dir=None, **kw):
    torch.manual_seed(0)
    model = build_model("schnet", hidden=8, num_interactions=2, num_rbf=6, cutoff=3.5).double()
    return janus_compile.compile(model, random_batch(0, 2), dump_dir=dump_dir, **kw)


def test_dump_dir_option_writes_every_artefact(tmp_path):
    compiled = _compiled(str(tmp_path))
    joint = compiled._joint_graphs[0]
    code = (tmp_path / "joint_graph.py").read_text()
    for phase in PHASES:
        assert f"phase={phase} " in code
    assert "module=interactions.0" in code and "fwd=" in code
    dot = (tmp_path / "joint_graph.dot").read_text()
    assert dot.startswith('digraph "joint"') and "cluster_" in dot and dot.count("->") > 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["joint_graph"]["nodes_per_phase"] == phase_counts(joint.gm.graph)
    assert set(summary["joint_graph"]["sizes"]) == {"atoms", "edges", "structures"}
    assert (tmp_path / "force_graph.py").exists()
    if shutil.which("dot"):
        assert (tmp_path / "joint_graph.svg").stat().st_size > 0


def test_env_variable_selects_dump_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JANUSPIPE_DUMP", str(tmp_path / "d"))
    _compiled()
    assert (tmp_path / "d" / "summary.json").exists()


def test_symbolic_shapes_on_nodes():
    compiled = _compiled()
    graph = compiled._joint_graphs[0].gm.graph
    shapes = {n.name: n.meta.get("shape") for n in graph.nodes if n.op == "placeholder"}
    assert str(shapes["positions"]) == "(atoms, 3)"
    assert str(shapes["edge_index"]) == "(2, edges)"
    assert str(shapes["cell"]) == "(structures, 3, 3)"
