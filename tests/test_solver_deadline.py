"""A CBC solve that runs past its deadline is stopped, and the ILP answers with its start."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from janus_compile.passes import symfold_ilp
from janus_compile.passes.solver_deadline import processes_naming, solve_with_deadline
from janus_compile.passes.symfold_ilp import STATUS_TIME_LIMIT, PartitionProblem, Unit, UnitEdge, solve_partition

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finding the solver process needs /proc")


def _sleeper(private_dir: str, seconds: float) -> int:
    """A child process that names ``private_dir`` on its command line, as CBC names its model."""
    return subprocess.run([sys.executable, "-c", f"import time; time.sleep({seconds})", private_dir]).returncode


@needs_proc
def test_a_solve_past_its_deadline_is_stopped(tmp_path):
    t0 = time.perf_counter()
    assert solve_with_deadline(lambda: _sleeper(str(tmp_path), 60), str(tmp_path), 0.5) is None
    assert time.perf_counter() - t0 < 10
    assert processes_naming(str(tmp_path)) == []


def test_a_solve_in_time_returns_its_result_or_raises(tmp_path):
    assert solve_with_deadline(lambda: _sleeper(str(tmp_path), 0), str(tmp_path), 60) == 0

    def fails():
        raise RuntimeError("solver broke")

    with pytest.raises(RuntimeError, match="solver broke"):
        solve_with_deadline(fails, str(tmp_path), 60)


@needs_proc
def test_only_this_solves_processes_are_stopped(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(other)])
    try:
        assert solve_with_deadline(lambda: _sleeper(str(tmp_path / "mine"), 60), str(tmp_path / "mine"), 0.2) is None
        assert bystander.poll() is None, "a process of another solve was stopped"
    finally:
        bystander.kill()
        bystander.wait()


@needs_proc
def test_ilp_stopped_at_its_deadline_answers_with_its_start(monkeypatch):
    """With the deadline at 0 s CBC is stopped as soon as it starts: the answer is the
    polished MIP start, a valid placement, with the combinatorial bound."""
    units = [Unit(f"u{i}", {"F": c, "G": 1.7 * c, "GG": 2.5 * c, "FB": 2.2 * c}) for i, c in enumerate([1.0, 2.0, 1.5, 0.5] * 10)]
    edges = [UnitEdge(i, i + 1, 1e6) for i in range(len(units) - 1)]
    problem = PartitionProblem(units=units, edges=edges, stages=4, chunks=2, order="dag", time_limit_s=30.0)
    monkeypatch.setattr(symfold_ilp, "cbc_deadline_s", lambda limit: 0.0)
    sol = solve_partition(problem)
    assert sol.status == STATUS_TIME_LIMIT
    assert sol.solve_seconds < 25
    a = sol.chunk_of_unit
    assert set(a) == set(range(8)) and all(a[e.src] <= a[e.dst] for e in edges)
    assert sol.bound is not None and sol.bound <= sol.objective
    assert sol.imbalance < 1.2  # the start is polished, not the even split of counts


@needs_proc
def test_lp_relaxation_stopped_at_its_deadline_gives_no_bound(monkeypatch, tmp_path):
    """The bound of a time-limited answer falls back on the LP relaxation; stopped, it
    gives none (rather than failing the whole partition)."""
    n = 120  # an LP CBC spends a good part of a second on: long enough to be caught
    units = [Unit(f"u{i}", {"F": 1.0 + i % 3}) for i in range(n)]
    problem = PartitionProblem(units=units, edges=[UnitEdge(i, i + 1, 1e6) for i in range(n - 1)], stages=8, chunks=4, order="dag")
    assert symfold_ilp._relaxation_bound(problem, 30.0, str(tmp_path)) is not None
    monkeypatch.setattr(symfold_ilp, "cbc_deadline_s", lambda limit: 0.0)
    assert symfold_ilp._relaxation_bound(problem, 30.0, str(tmp_path)) is None


def _failing_cbc(monkeypatch, tmp_path):
    """Point pulp's CBC at a real program that exits with an error, as CBC does when it crashes."""
    fake = tmp_path / "cbc"
    fake.write_text("#!/bin/sh\necho 'Segmentation fault (core dumped)'\nexit 139\n")
    fake.chmod(0o755)
    make = symfold_ilp._solver

    def solver(*args, **kwargs):
        s = make(*args, **kwargs)
        s.path = str(fake)
        return s

    monkeypatch.setattr(symfold_ilp, "_solver", solver)


def test_ilp_whose_solver_fails_answers_with_its_start(monkeypatch, tmp_path, caplog):
    """CBC exiting with an error is not the end of planning: the polished MIP start is a
    valid answer, and the warning says what happened."""
    from janus_compile.passes.symfold_ilp import STATUS_SOLVER_FAILED

    units = [Unit(f"u{i}", {"F": c, "G": 1.7 * c, "GG": 2.5 * c, "FB": 2.2 * c}) for i, c in enumerate([1.0, 2.0, 1.5, 0.5] * 10)]
    edges = [UnitEdge(i, i + 1, 1e6) for i in range(len(units) - 1)]
    problem = PartitionProblem(units=units, edges=edges, stages=4, chunks=2, time_limit_s=30.0)
    _failing_cbc(monkeypatch, tmp_path)
    with caplog.at_level("WARNING"):
        sol = solve_partition(problem)
    assert sol.status == STATUS_SOLVER_FAILED
    a = sol.chunk_of_unit
    assert sorted(set(a)) == list(range(8)) and all(a[e.src] <= a[e.dst] for e in edges)
    assert sol.bound == pytest.approx(min(symfold_ilp._combinatorial_bound(problem), sol.objective))
    assert sol.imbalance < 1.2
    assert "CBC failed" in caplog.text and "Segmentation fault" in caplog.text


def test_ilp_whose_solver_fails_without_a_start_says_so(monkeypatch, tmp_path):
    """With no MIP start to fall back on (as under a memory cap no in-order split meets;
    here the start is taken away) the error names the failure and what to try."""
    from janus_compile.passes.symfold_ilp import PartitionError

    units = [Unit(f"u{i}", {"F": 1.0, "G": 1.0, "GG": 1.0, "FB": 1.0}, stash_bytes=1e6 * (1 + i % 3)) for i in range(12)]
    edges = [UnitEdge(i, i + 1, 1e3) for i in range(len(units) - 1)]
    problem = PartitionProblem(units=units, edges=edges, stages=2, chunks=2, time_limit_s=5.0, order="dag", memory_cap_bytes=None)
    _failing_cbc(monkeypatch, tmp_path)
    monkeypatch.setattr(symfold_ilp, "_mip_start", lambda *a, **k: None)
    with pytest.raises(PartitionError, match="CBC failed .* no MIP start"):
        solve_partition(problem)
