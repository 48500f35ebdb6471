"""The local launcher keeps results that every rank reported, and fails when one did not."""
from __future__ import annotations

import atexit
import logging
import os

import pytest
import torch

from janus_compile.runtime.launch import START_METHOD_ENV, WorkerError, launch_local, start_method


def _result_then_abort_at_exit(rank: int, world_size: int) -> int:
    atexit.register(os._exit, 3)  # the process dies after the launcher saved its result
    return rank * 10


def _environment_seen(rank: int, world_size: int) -> tuple:
    return os.environ.get("JANUSPIPE_TEST_SET_LATER"), os.environ.get("JANUSPIPE_TEST_REMOVED_LATER")


def _rank1_dies_before_its_result(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(5)
    return rank


def test_crash_after_every_rank_reported_keeps_the_results(caplog, monkeypatch):
    # spawned: a forkserver child leaves through os._exit, which skips atexit handlers
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    with caplog.at_level(logging.WARNING, logger="janus_compile.runtime.launch"):
        assert launch_local(_result_then_abort_at_exit, 2, timeout_s=30) == [0, 10]
    assert "exited abnormally after every rank had reported" in caplog.text


def test_crash_before_a_result_names_the_rank():
    with pytest.raises(WorkerError, match="rank 1: exited without a result"):
        launch_local(_rank1_dies_before_its_result, 2, timeout_s=30)


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("terminated while writing")


def test_a_report_interrupted_while_written_leaves_no_file(tmp_path):
    """A rank killed while writing its report must leave no half-written file, which the
    parent would fail to read instead of naming the rank that died."""
    from janus_compile.runtime.launch import _save_report

    path = tmp_path / "rank1.pt"
    with pytest.raises(RuntimeError, match="terminated while writing"):
        _save_report({"ok": False, "error": "x", "payload": [torch.zeros(1000), _FailsToPickle()]}, path)
    assert not path.exists()
    _save_report({"ok": True, "result": 3}, path)
    assert torch.load(path, weights_only=False) == {"ok": True, "result": 3}


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_see_the_environment_at_launch(monkeypatch, method):
    """A forkserver child inherits the server's environment, taken when it started; the
    launcher hands every worker this process's environment at launch instead, as a
    spawned one gets it: a variable set since arrives, one removed since is gone."""
    monkeypatch.setenv(START_METHOD_ENV, method)
    monkeypatch.setenv("JANUSPIPE_TEST_REMOVED_LATER", "old")
    assert launch_local(_environment_seen, 2, timeout_s=60) == [(None, "old")] * 2  # the server, if any, is running now
    monkeypatch.setenv("JANUSPIPE_TEST_SET_LATER", "new")
    monkeypatch.delenv("JANUSPIPE_TEST_REMOVED_LATER")
    assert launch_local(_environment_seen, 2, timeout_s=60) == [("new", None)] * 2


def test_start_method_default_and_a_bad_choice(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert start_method() == "forkserver"  # Linux
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(ValueError, match="JANUSPIPE_START_METHOD='fork': choose one of"):
        start_method()


def test_a_startup_variable_changed_since_the_server_started_spawns(monkeypatch, caplog):
    """A forkserver child keeps the server's reading of variables read at start-up
    (malloc, OpenMP, torch's configuration): once one changed, launches spawn."""
    from janus_compile.runtime import launch

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert launch_local(_environment_seen, 2, timeout_s=60)  # the forkserver runs from here on
    monkeypatch.setattr(launch, "_server_environment", launch._startup_variables())
    assert start_method() == "forkserver"
    monkeypatch.setenv("TORCHINDUCTOR_JANUSPIPE_TEST", "1")
    with caplog.at_level(logging.INFO, logger="janus_compile.runtime.launch"):
        assert start_method() == "spawn"
    assert "TORCHINDUCTOR_JANUSPIPE_TEST" in caplog.text
