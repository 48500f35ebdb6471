"""Bucketed gradient sync: buckets, launch points, and overlap with a real program."""
from __future__ import annotations

import torch

from janus_compile.runtime.gradsync import OverlappedGradSync, launch_points, make_buckets
from janus_compile.runtime.program import Compute, RankProgram


def test_buckets_are_reverse_registration_order_and_bounded():
    sizes = [400, 400, 400, 100, 2000]
    buckets = make_buckets(sizes, bucket_bytes=900)
    assert [k for b in buckets for k in b] == [4, 3, 2, 1, 0]
    assert buckets[0] == [4]  # one oversized parameter gets a bucket of its own
    assert all(sum(sizes[k] for k in b) <= 900 for b in buckets if len(b) > 1)


def test_a_bucket_waits_for_its_slowest_gradient_and_for_earlier_buckets():
    ready = [7, -1, 3, 9]
    buckets = [[3], [2, 1], [0]]
    assert launch_points(ready, buckets) == [9, 9, 9]
    assert launch_points([7, -1, 3, 1], [[3], [2, 1], [0]]) == [1, 3, 7]
    assert launch_points([-1, -1], [[1], [0]]) == [-1, -1]


def test_sync_launches_early_buckets_before_the_step_ends_and_sums_micro_batches():
    params = [torch.zeros(2), torch.zeros(3)]
    grad_args = ["g0", "g1"]
    # g1 is final after action 0, g0 after action 2: the g1 bucket goes out after action 0
    sync = OverlappedGradSync(params, grad_args, ready_at=[2, 0], group=None, bucket_bytes=1)
    sync.start()
    sync.on_compute(0, {"g1": torch.ones(3)})
    assert [e["bucket"] for e in sync.launched] == [0]
    sync.on_compute(1, {"g0": torch.ones(2)})
    sync.on_compute(2, {"g0": torch.ones(2)})
    assert len(sync.launched) == 2 and sync.launched[1]["after_action"] == 2
    grads, loss = sync.finish(torch.tensor(1.5, dtype=torch.float64))
    assert torch.equal(grads[0], torch.full((2,), 2.0)) and torch.equal(grads[1], torch.ones(3)) and loss == 1.5


def test_gradient_ready_at_reads_the_program():
    from janus_compile.runtime.gradsync import gradient_ready_at

    prog = RankProgram(rank=0, actions=[Compute(0, "F", 0), Compute(0, "FB", 0), Compute(0, "F", 1), Compute(0, "FB", 1)])
    outputs = {(0, "F"): ["x"], (0, "FB"): ["g0"]}
    assert gradient_ready_at(prog, outputs, ["g0", "g1", None]) == [3, -1, -1]
