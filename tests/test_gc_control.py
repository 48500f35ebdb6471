"""The training loop's garbage-collector control: off inside, restored after."""
from __future__ import annotations

import gc
import weakref

from janus_compile.runtime.gc_control import StepGarbageCollection


class _Node:
    def __init__(self) -> None:
        self.other: object = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # only the cyclic collector frees these
    return weakref.ref(a)


def test_collector_is_off_inside_and_setup_is_frozen():
    assert gc.isenabled()
    with StepGarbageCollection():
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_between_steps_frees_the_cycles_a_step_made():
    with StepGarbageCollection() as collector:
        dead = _cycle()
        assert dead() is not None  # automatic collection is off: nothing frees it yet
        collector.between_steps()
        assert dead() is None
        assert collector.collections == 1


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with StepGarbageCollection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_state_is_restored_when_the_loop_fails():
    try:
        with StepGarbageCollection():
            raise RuntimeError("a step failed")
    except RuntimeError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0
