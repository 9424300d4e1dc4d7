"""Availability slots whose boundaries are not whole ticks (a period of 0.1 s or 1/3 s).

A boundary k·period computed in float seconds can round to the very tick at which it was
asked for. Every protocol that waits for a client to come back must then look again at
least one tick later, or it sees the old slot again at the same instant: asynchronous
gossip looped there for ever, and FedBuff stopped dispatching for the rest of the run.
"""
from __future__ import annotations

import _thread
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest

from fedsim.clock import tick_after, to_seconds, to_ticks
from fedsim.system.models import SystemContext, bernoulli_availability

from .conftest import quadratic_config, run_config
from .test_async_gossip import gossip_config

THIRD = 1 / 3


@contextmanager
def stops_within(seconds: float) -> Iterator[None]:
    """Interrupts the test's thread (as Ctrl-C does) if the block runs longer than `seconds`:
    a run that stops advancing its clock fails here instead of hanging the suite."""
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.mark.parametrize("period", [0.1, THIRD])
def test_a_boundary_can_round_back_onto_its_tick_and_tick_after_moves_past_it(period):
    model = bernoulli_availability(SystemContext(4, 0), p_on=0.5, period=period)
    ticks = [to_ticks(k * period) for k in range(1, 2000)]
    nexts = [model.next_change(to_seconds(t)) for t in ticks]
    assert any(to_ticks(n) == t for t, n in zip(ticks, nexts))  # the case exists for this period
    assert all(tick_after(t, n) > t for t, n in zip(ticks, nexts))
    assert all(tick_after(t, n) == to_ticks(n) for t, n in zip(ticks, nexts) if to_ticks(n) > t)  # else untouched


def test_tick_after_keeps_a_later_boundary_s_own_tick():
    assert tick_after(5, 2.0) == to_ticks(2.0)
    assert tick_after(to_ticks(2.0), 2.0) == to_ticks(2.0) + 1


@pytest.mark.parametrize("protocol", [{"name": "async", "buffer_size": 1, "concurrency": 4}, {"name": "sync"}],
                         ids=["fedbuff", "sync"])
def test_runs_keep_aggregating_across_boundaries_that_round_back(protocol):
    cfg = quadratic_config(data={"num_clients": 4}, protocol=protocol,
                           system={"availability": {"name": "bernoulli", "p_on": 0.3, "period": THIRD},
                                   "compute": {"name": "constant", "step_time": 0.01}},
                           local={"steps": 1},
                           run={"rounds": None, "time_budget": 20.0, "eval_every_time": 5.0, "log_events": False})
    with stops_within(120):
        rows = run_config(cfg).rows
    counts = [r["aggregations"] for r in rows]
    # before the fix, FedBuff: 169 aggregations by 5 s, then none (no retry was scheduled)
    assert len(counts) == 5 and all(b > a for a, b in zip(counts, counts[1:])), counts


def test_async_gossip_wakes_a_node_after_a_boundary_that_rounds_back():
    cfg = gossip_config(system={"availability": {"name": "bernoulli", "p_on": 0.5, "period": THIRD}},
                        run={"log_events": False, "time_budget": 3.0, "eval_every_time": 3.0})
    with stops_within(120):  # before the fix: the same instant, for ever
        run = run_config(cfg)
    assert run.rows[-1]["virtual_time"] == pytest.approx(3.0)
    assert run.final_state.jobs_done > 0
