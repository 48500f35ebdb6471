"""torchrun entry: one process per rank, rank 0 compiles and broadcasts the plan."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_torchrun_pp_dp_training_matches_eager(tmp_path):
    out = tmp_path / "losses.json"
    run = _torchrun(4, "examples/torchrun_train.py", "--stages", "2", "--data-parallel", "2", "--microbatches", "1",
                    "--epochs", "2", "--check", "--out", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["world"] == 4 and len(report["losses"]) == 4
    assert report["max_rel_diff"] <= 1e-9, report


def test_torchrun_with_the_wrong_process_count_names_the_fix(tmp_path):
    run = _torchrun(2, "examples/torchrun_train.py", "--stages", "2", "--graph-parallel", "2", timeout=300)
    assert run.returncode != 0
    assert "needs 4" in run.stderr and "nproc-per-node" in run.stderr, run.stderr[-3000:]
