"""Timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import time
from typing import Any, Callable


def record_round_ends(run: Any, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Wraps `run`'s protocol step so that each step appends `clock()` when it returns; returns
    the list it fills (one entry per round, evaluations excluded)."""
    ends: list[float] = []
    step = run.protocol.step

    def timed_step(ctx, state):
        out = step(ctx, state)
        ends.append(clock())
        return out

    run.protocol.step = timed_step
    return ends
