"""`objects_frozen`: a run's pre-existing objects stay out of the garbage collector while it
runs, and are handed back (garbage cycles among them freed) when the last run ends."""
from __future__ import annotations

import gc
import weakref

from fedsim.config import load_config
from fedsim.frozen_objects import objects_frozen
from fedsim.runner import build, drive

from .conftest import quadratic_config


class _Node:
    pass


def test_a_cycle_dropped_while_frozen_is_freed_after():
    node = _Node()
    node.me = node
    ref = weakref.ref(node)
    with objects_frozen():
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # the collector skips frozen objects
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_overlapping_holders_unfreeze_when_the_last_leaves():
    first, second = objects_frozen(), objects_frozen()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_freeze_count() > 0  # the second run (a vectorised sweep's thread) still runs
    second.__exit__(None, None, None)
    assert gc.get_freeze_count() == 0


def test_a_run_runs_frozen_and_unfreezes_at_its_end():
    run = build(load_config(quadratic_config(run={"rounds": 3, "eval_every": 3})))
    seen: list[int] = []
    real = run.ctx.executor.run

    def counting(jobs):
        seen.append(gc.get_freeze_count())
        return real(jobs)

    run.ctx.executor.run = counting
    drive(run, None, progress=False)
    assert len(seen) == 3 and min(seen) > 0
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_is_left_alone():
    node = _Node()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with objects_frozen():
            made = _Node()
            assert gc.get_freeze_count() == frozen  # nothing more frozen
        assert gc.get_freeze_count() == frozen  # and nothing unfrozen
        del made
    finally:
        gc.unfreeze()
    del node
