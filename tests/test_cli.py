"""The command line a user runs: demo, train (extxyz, checkpoints), inspect."""
from __future__ import annotations

import pytest
import torch

from janus_compile.cli import main
from janus_compile.data import emt_dataset, write_extxyz
from janus_compile.models import build_model
from janus_compile.training import load_checkpoint

SMALL = ["--hidden", "8", "--layers", "1", "--batch-size", "4"]


@pytest.mark.distributed
def test_demo_pipeline_loss_goes_down(capsys, tmp_path):
    """The demo: pipeline training on local processes with WaveK, dumps included."""
    args = ["demo", "--epochs", "3", "--structures", "8", "--hidden", "8", "--layers", "2", "--stages", "2"]
    assert main(args + ["--dump-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "loss went down" in out and "structures/s" in out, out
    for f in ("schedule.json", "gantt_simulated.svg", "gantt_measured.svg", "trace_rank1.json", "programs/rank0.py", "partition.md"):
        assert (tmp_path / f).exists(), f


def test_single_process_demo_loss_goes_down(capsys):
    assert main(["demo", "--epochs", "4", "--structures", "8", "--stages", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "loss went down" in out, out


def test_train_on_extxyz_with_checkpoint_that_loads_into_eager_model(tmp_path, capsys):
    data = tmp_path / "train.extxyz"
    write_extxyz(data, emt_dataset("cu", num_structures=6, seed=3, size=8, cache_dir=tmp_path))
    ckpt = tmp_path / "model.pt"
    assert main(["train", str(data), "--epochs", "2", "--checkpoint", str(ckpt), *SMALL]) == 0
    eager = build_model("schnet", hidden=8, num_interactions=1, cutoff=4.5)
    assert load_checkpoint(ckpt, eager) == 2
    assert main(["train", str(data), "--epochs", "3", "--checkpoint", str(ckpt), "--resume", *SMALL]) == 0
    assert "    3 " in capsys.readouterr().out  # resumed at epoch 3, did not redo 1-2


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.extxyz")]) == 2
    assert "nope.extxyz" in capsys.readouterr().err


def test_bad_command_lines_are_clear_errors_before_any_work(tmp_path, capsys):
    """Each names the flag and the fix, as `januspipe: error: ...` (exit 2), not a traceback."""
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("not an extxyz file\n")
    missing_folder = str(tmp_path / "no" / "such" / "out.json")
    cases = [
        (["train", str(garbage)], "could not be read as extended XYZ"),
        (["train", str(garbage), "--resume"], "--resume continues from a checkpoint: name it with --checkpoint"),
        (["bench", "--no-real"], "nothing to run: --no-real"),
        (["bench", "--no-real", "--simulate", "--sim-stages", "0"], r"sim_stages must be integers >= 2"),
        (["bench", "--no-real", "--simulate", "--sim-bandwidth", "0"], "sim_bandwidth_gbs must be positive"),
        (["calibrate", "--atoms", "4", "--out", str(tmp_path / "c.json")], "add --large 0"),
        (["calibrate", "--device", "cpu", "--out", missing_folder], "--out .* does not exist; create it first"),
        (["calibrate", "--device", "gpu", "--out", str(tmp_path / "c.json")], "'gpu' is not a torch device"),
        (["step-bench", "--device", "cpu", "--atoms", "0"], r"atoms must be >= 1, got 0 \(--atoms\)"),
        (["step-bench", "--device", "cpu", "--threads", "-1"], "threads must be >= 0"),
        (["step-bench", "--device", "cpu", "--json", missing_folder], "--json .* create it first"),
        (["gp-bench", "--graph-parallel", "a,b"], "comma-separated integers"),
        (["gp-bench", "--atoms", "0"], r"atoms must be >= 1, got 0 \(--atoms\)"),
        (["bench", "--out", missing_folder], "--out .* create it first"),
    ]
    import re

    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("januspipe: error:") and re.search(message, err), (argv, err)


def test_train_reads_labels_under_other_names(tmp_path, capsys):
    """--energy-key/--forces-key: the missing-label error names them, and they work."""
    import ase.io

    structures = emt_dataset("cu", num_structures=4, seed=3, size=8, cache_dir=tmp_path)
    for atoms in structures:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
    data = tmp_path / "ref.extxyz"
    ase.io.write(data, structures, format="extxyz")
    assert main(["train", str(data), "--epochs", "1", *SMALL]) == 2
    assert "--energy-key/--forces-key/--stress-key" in capsys.readouterr().err
    keys = ["--energy-key", "REF_energy", "--forces-key", "REF_forces"]
    assert main(["train", str(data), "--epochs", "1", *keys, *SMALL]) == 0


def test_inspect_writes_dumps(tmp_path, capsys):
    assert main(["inspect", "--dump-dir", str(tmp_path), *SMALL[:4]]) == 0
    assert (tmp_path / "joint_graph.py").exists() and (tmp_path / "summary.json").exists()
    assert '"GG"' in capsys.readouterr().out


def test_readme_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parameter gradients" in out.stdout


@pytest.mark.distributed
def test_pipelined_train_checkpoint_and_resume(tmp_path, capsys):
    data = tmp_path / "train.extxyz"
    write_extxyz(data, emt_dataset("cu", num_structures=4, seed=5, size=8, cache_dir=tmp_path))
    ckpt = tmp_path / "pipe.pt"
    common = [str(data), "--stages", "2", "--microbatches", "2", "--hidden", "8", "--layers", "2", "--batch-size", "2", "--checkpoint", str(ckpt)]
    assert main(["train", *common, "--epochs", "1"]) == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    capsys.readouterr()
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "\n    2 " in out and "\n    1 " not in out, out
    eager = build_model("schnet", hidden=8, num_interactions=2, cutoff=4.5)
    assert load_checkpoint(ckpt, eager) == 2


@pytest.mark.slow  # the mesh itself is tested in test_parallel3d.py; this is the CLI path
@pytest.mark.distributed
def test_train_on_a_data_and_graph_parallel_mesh(tmp_path, capsys):
    """`train --data-parallel 2 --graph-parallel 2`: 4 processes, loss goes down."""
    data = tmp_path / "train.extxyz"
    write_extxyz(data, emt_dataset("cu", num_structures=4, seed=6, size=8, cache_dir=tmp_path))
    args = [str(data), "--stages", "1", "--microbatches", "1", "--data-parallel", "2", "--graph-parallel", "2",
            "--hidden", "8", "--layers", "1", "--batch-size", "4", "--epochs", "3", "--lr", "1e-2"]
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "(pp, dp, gp) = (1, 2, 2) = 4 processes" in out and "loss went down" in out, out


@pytest.mark.slow
@pytest.mark.distributed
def test_gp_bench_reports_memory_per_gp_size(tmp_path, capsys):
    out_json = tmp_path / "gp.json"
    args = ["gp-bench", "--atoms", "100", "--graph-parallel", "1,2", "--steps", "1", "--hidden", "8", "--layers", "1", "--json", str(out_json)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "edges/rank" in out, out
    import json

    rows = json.loads(out_json.read_text())["rows"]
    assert [r["gp"] for r in rows] == [1, 2]
    assert rows[1]["edges_per_rank"] * 2 in (rows[0]["edges_per_rank"], rows[0]["edges_per_rank"] + 1)
    assert rows[1]["est_edge_mb"] < 0.6 * rows[0]["est_edge_mb"]
