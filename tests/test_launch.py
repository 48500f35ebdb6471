"""The local launcher keeps results that every rank reported, and fails when one did not."""
from __future__ import annotations

import atexit
import logging
import os

import pytest
import torch

from janus_compile.runtime.launch import WorkerError, launch_local


def _result_then_abort_at_exit(rank: int, world_size: int) -> int:
    atexit.register(os._exit, 3)  # the process dies after the launcher saved its result
    return rank * 10


def _rank1_dies_before_its_result(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(5)
    return rank


def test_crash_after_every_rank_reported_keeps_the_results(caplog):
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
