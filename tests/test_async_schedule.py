"""The asynchronous schedule: exact traces, aggregation counts and exact time (no learning needed).

Four clients with linearly spaced durations τ = (1, 0.75, 0.5, 0.25) (Fraboni et al.'s F-75;
one local step per job, so τ_i is the step time). Every expected sequence below was derived
by hand from their schedule code (FL/clients_schedule.py); `exact_schedule` re-states its
loop in exact rational arithmetic for a second, independent check on long schedules.
"""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from fedsim.clock import TICKS_PER_SECOND, to_ticks
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.protocols.async_engine import ScheduleState, Trace
from fedsim.runner import build

from .conftest import quadratic_config, run_config


def async_config(protocol: dict, n: int = 4, spread: float = 75.0, budget: float = 3.0) -> dict:
    """A quadratic run with one local step per job and F-`spread` step times (slowest 1 s)."""
    return quadratic_config(
        data={"num_clients": n},
        local={"steps": 1, "lr": 0.05},
        system={"compute": {"name": "linear", "slowest": 1.0, "spread": spread}},
        protocol={"name": "async", **protocol},
        run={"rounds": None, "time_budget": budget},
    )


def trace(protocol: dict, **kw) -> Trace:
    """Runs the schedule of `protocol` alone (no learning) and returns its trace."""
    run = build(load_config(async_config(protocol, **kw)))
    tr = Trace(lambda client, job: 1, keep_events=True)
    run.protocol.engine.run(ScheduleState(), tr)
    return tr


def aggregations(tr: Trace) -> list[tuple[float, list[int], list[int]]]:
    """(time, clients in arrival order, their staleness) of every aggregation."""
    return [(e["time"], e["clients"], e["staleness"]) for e in tr.events if e["kind"] == "aggregate"]


# ---------------------------------------------------------------- hand-derived traces
def test_async_fedavg_trace():
    # every arrival aggregates; ties at one tick go to the lowest client id (Fraboni's argmin)
    got = aggregations(trace({}, budget=2.0))
    assert got == [
        (0.25, [3], [0]), (0.5, [2], [1]), (0.5, [3], [1]), (0.75, [1], [3]), (0.75, [3], [1]),
        (1.0, [0], [5]), (1.0, [2], [4]), (1.0, [3], [2]), (1.25, [3], [0]), (1.5, [1], [5]),
        (1.5, [2], [3]), (1.5, [3], [2]), (1.75, [3], [0]), (2.0, [0], [7]), (2.0, [2], [3]), (2.0, [3], [2]),
    ]


def test_fedfix_trace_windows_of_half():
    got = aggregations(trace({"window": 0.5}, budget=3.0))
    fast, everyone = ([3, 2], [0, 0]), ([1, 3, 0, 2], [1, 0, 1, 0])
    assert got == [(t, *(fast if k % 2 == 0 else everyone)) for k, t in enumerate([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])]


def test_fedfix_trace_windows_of_fifth_with_empty_window_and_exact_boundary():
    # client i joins every ⌈τ_i/Δt⌉ = (5, 4, 3, 2) windows; the first window is empty and is no
    # aggregation (no new version, not counted toward run.rounds); client 0's job ends exactly
    # at the window boundary t = 1.0 and belongs to that window
    got = aggregations(trace({"window": 0.2}, budget=1.2))
    assert [(t, c) for t, c, _ in got] == [
        (0.4, [3]), (0.6, [2]), (0.8, [3, 1]), (1.0, [0]), (1.2, [3, 2]),
    ]


def test_fedfix_rounds_count_aggregations_not_empty_windows(tmp_path):
    # windows of 0.1 s while the fastest client needs 0.25 s: most windows are empty; a budget of
    # 3 rounds is 3 aggregations that applied something
    cfg = async_config({"window": 0.1})
    cfg["run"] = {"rounds": 3, "log_events": True}
    run_config(cfg, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    merged = [e for e in events if e["kind"] == "aggregate"]
    assert len(merged) == 3 and all(e["clients"] for e in merged)
    assert [e["version"] for e in merged] == [1, 2, 3]
    assert sum(e["kind"] == "empty_window" for e in events) >= 2


def test_fedbuff_semisync_trace():
    # FedBuff-c as Fraboni et al. simulate it: the c earliest wait for the c-th, then all restart
    got = aggregations(trace({"buffer_size": 2, "redispatch": "aggregation"}, budget=2.0))
    assert got == [
        (0.5, [3, 2], [0, 0]), (0.75, [1, 3], [1, 0]), (1.0, [0, 2], [2, 1]),
        (1.5, [3, 1], [1, 1]), (1.75, [2, 3], [1, 0]), (2.0, [0, 3], [2, 0]),
    ]


def test_fedbuff_immediate_trace():
    # FedBuff as Nguyen et al.: buffer K = 2 arrivals, every client restarts at once
    got = aggregations(trace({"buffer_size": 2}, budget=1.0))
    assert got == [(0.5, [3, 2], [0, 0]), (0.75, [3, 1], [1, 1]), (1.0, [3, 0], [1, 2]), (1.0, [2, 3], [2, 1])]


def test_buffer_of_everyone_is_synchronous_fedavg():
    got = aggregations(trace({"buffer_size": 4, "redispatch": "aggregation"}, budget=3.0))
    assert got == [(t, [3, 2, 1, 0], [0, 0, 0, 0]) for t in (1.0, 2.0, 3.0)]


# ---------------------------------------------------------------- Fraboni's loop, in exact arithmetic
def exact_tau(n: int, spread: float) -> list[Fraction]:
    """τ_i = 1 − i·(spread/100)/(n − 1) as exact rationals (the decimals of the config)."""
    return [1 - Fraction(str(spread)) / 100 * i / (n - 1) for i in range(n)]


def exact_schedule(tau: list[Fraction], scheme: str, budget: Fraction, param: Fraction | int = 0,
                   complete: bool = False) -> list[tuple[Fraction, list[int]]]:
    """Fraboni et al.'s clients_schedule.py loop in exact rational
    arithmetic: the (time, clients in arrival order) of each aggregation. Arrival order and
    ties go by return time, then lowest id (their argmin; for FedBuff np.argpartition leaves
    the order of ties unspecified). Their FedBuff loop only asks the earliest return to be
    ≤ T, so its last aggregation may land after T (`complete`); without it the loop stops
    at T like fedsim's default. FL is FedBuff with c = M, stopped at T (⌊T / max τ⌋ rounds)."""
    m, ret, out = len(tau), list(tau), []

    def by_return(ids):
        return sorted(ids, key=lambda j: (ret[j], j))

    if scheme == "async":
        while min(ret) <= budget:
            i = by_return(range(m))[0]
            out.append((ret[i], [i]))
            ret[i] += tau[i]
    elif scheme == "fedfix":
        for k in range(1, int(budget // param) + 1):
            t = k * param
            members = by_return([i for i in range(m) if ret[i] <= t])
            out.append((t, members))
            for i in members:
                ret[i] = t + tau[i]
    elif scheme == "fedbuff":
        while min(ret) <= budget:
            members = by_return(range(m))[:param]
            t = ret[members[-1]]
            if t > budget and not complete:
                break
            out.append((t, members))
            for i in members:
                ret[i] = t + tau[i]
    return out


SCHEMES = [  # (protocol, scheme, parameter): Fraboni et al.'s FL, Async, FedFix-Δt, FedBuff-c
    ({"buffer_size": "n", "redispatch": "aggregation"}, "fedbuff", "n"),
    ({}, "async", 0),
    ({"window": 0.2}, "fedfix", Fraction(1, 5)),
    ({"window": 0.5}, "fedfix", Fraction(1, 2)),
    ({"window": 0.8}, "fedfix", Fraction(4, 5)),
    ({"buffer_size": 2, "redispatch": "aggregation"}, "fedbuff", 2),
    ({"buffer_size": 5, "redispatch": "aggregation"}, "fedbuff", 5),
]


@pytest.mark.parametrize("spread,n,budget", [(80.0, 10, 400), (50.0, 7, 60), (0.0, 6, 30)])
@pytest.mark.parametrize("protocol,scheme,param", SCHEMES)
def test_schedule_equals_exact_fraboni_loop(protocol, scheme, param, spread, n, budget):
    # τ_i are not whole nanoseconds (5/9 s = 555555555.6 ns): rounding each job to a tick
    # drifts by up to ½ tick per job, loses the arrival at exactly T (client 5 of F-80: 720
    # jobs) and breaks exact ties by the drift instead of the lowest id
    protocol = {k: n if v == "n" else v for k, v in protocol.items()}
    param = n if param == "n" else param
    tr = trace(protocol, n=n, spread=spread, budget=float(budget))
    want = exact_schedule(exact_tau(n, spread), scheme, Fraction(budget), param)
    want = [(t, c) for t, c in want if c]  # an empty window changes nothing and is no aggregation in fedsim
    got = [(to_ticks(t), c) for t, c, _ in aggregations(tr)]
    assert got == [(round(t * TICKS_PER_SECOND), c) for t, c in want]


@pytest.mark.parametrize("c,spread,n,budget", [(2, 80.0, 10, 400), (5, 80.0, 10, 400), (5, 50.0, 7, 60)])
def test_fedbuff_at_the_budget_stops_or_completes_the_last_buffer(c, spread, n, budget):
    protocol = {"buffer_size": c, "redispatch": "aggregation"}
    tau = exact_tau(n, spread)
    stopped = exact_schedule(tau, "fedbuff", Fraction(budget), c)
    completed = exact_schedule(tau, "fedbuff", Fraction(budget), c, complete=True)
    assert completed[:-1] == stopped and completed[-1][0] > budget  # one aggregation past T
    for at_budget, want in (("stop", stopped), ("complete", completed)):
        tr = trace({**protocol, "at_budget": at_budget}, n=n, spread=spread, budget=float(budget))
        got = [(to_ticks(t), c) for t, c, _ in aggregations(tr)]
        assert got == [(round(t * TICKS_PER_SECOND), c) for t, c in want], at_budget


def test_completed_buffer_ends_the_run_after_the_budget(tmp_path):
    # the learning run follows the schedule past T: its last row is the model of that
    # aggregation, at its time; the grid rows stop at T
    protocol = {"buffer_size": 2, "redispatch": "aggregation", "at_budget": "complete"}
    cfg = async_config(protocol, n=7, spread=50.0, budget=2.0)
    cfg["run"].update({"log_events": True, "eval_every_time": 0.5})
    run = run_config(cfg, tmp_path / "run")
    want = exact_schedule(exact_tau(7, 50.0), "fedbuff", Fraction(2), 2, complete=True)
    assert want[-1][0] > 2
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    logged = [(to_ticks(e["time"]), e["clients"]) for e in events if e["kind"] == "aggregate"]
    assert logged == [(round(t * TICKS_PER_SECOND), c) for t, c in want]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["virtual_time"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, logged[-1][0] / TICKS_PER_SECOND]
    assert rows[-1]["aggregations"] == len(want) == run.final_state.aggregations
    assert rows[-2]["aggregations"] == len(want) - 1


def test_a_window_cannot_complete_a_buffer():
    with pytest.raises(ConfigError) as err:
        build(load_config(async_config({"window": 0.5, "at_budget": "complete"})))
    assert "protocol.at_budget" in str(err.value)


def test_aggregation_counts_in_a_time_budget():
    n, budget = 10, Fraction("7.3")
    tau = exact_tau(n, 80.0)
    assert len(trace({}, n=n, spread=80.0, budget=7.3).aggregations) == sum(budget // t for t in tau)
    for dt in ("0.2", "0.5", "0.8"):
        got = len(trace({"window": float(dt)}, n=n, spread=80.0, budget=7.3).aggregations)
        assert got == budget // Fraction(dt)
    sync = trace({"buffer_size": n, "redispatch": "aggregation"}, n=n, spread=80.0, budget=7.3)
    assert len(sync.aggregations) == budget // max(tau) == 7


# ---------------------------------------------------------------- exact time
def test_duration_an_exact_multiple_of_the_window_lands_in_that_window():
    # 3 steps × 0.1 s = 0.30000000000000004 in floats, which a float clock would put after
    # the window boundary 0.3; on the tick clock the job ends exactly at the boundary.
    assert 3 * 0.1 > 0.3
    cfg = async_config({"window": 0.3}, n=2, spread=0.0, budget=0.9)
    cfg["local"]["steps"] = 3
    cfg["system"]["compute"] = {"name": "constant", "step_time": 0.1}
    run = build(load_config(cfg))
    tr = Trace(lambda client, job: 3, keep_events=True)
    run.protocol.engine.run(ScheduleState(), tr)
    assert [(t, c) for t, c, _ in aggregations(tr)] == [(0.3, [0, 1]), (0.6, [0, 1]), (0.9, [0, 1])]


# ---------------------------------------------------------------- weights from the schedule
def test_unbiased_frequencies_equal_fraboni_closed_forms_over_whole_periods():
    run = build(load_config(async_config({"weighting": "unbiased"}, budget=3.0)))
    tau = np.array([1.0, 0.75, 0.5, 0.25])
    # 3 s is a whole number of every τ_i: f_i = (1/τ_i)/Σ_j 1/τ_j exactly (Async_weight)
    assert run.protocol._f == pytest.approx((1 / tau) / (1 / tau).sum(), abs=1e-15)
    run = build(load_config(async_config({"window": 0.2, "weighting": "unbiased"}, budget=12.0)))
    # 60 windows, a multiple of lcm(5, 4, 3, 2): f_i = 1/⌈τ_i/Δt⌉ exactly (FedFix_weight)
    assert run.protocol._f == pytest.approx(1 / np.ceil(tau / 0.2 - 1e-9), abs=1e-15)


def test_learning_run_follows_the_traced_schedule(tmp_path):
    cfg = async_config({"buffer_size": 2, "redispatch": "aggregation"}, budget=4.0)
    cfg["run"].update({"log_events": True, "eval_every_time": 0.5})
    run = run_config(cfg, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    logged = [(e["time"], e["clients"], e["staleness"]) for e in events if e["kind"] == "aggregate"]
    assert logged == aggregations(trace({"buffer_size": 2, "redispatch": "aggregation"}, budget=4.0))
    for e in events:
        assert {"time", "kind"} <= set(e)
        if e["kind"] in ("dispatch", "arrival"):
            assert {"client", "version"} <= set(e)
        if e["kind"] == "arrival":
            assert e["staleness"] >= 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["aggregations"] == len(logged) == run.final_state.aggregations
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["virtual_time"] for r in rows] == [k * 0.5 for k in range(9)]
    # staleness of the updates aggregated in (t − 0.5, t], read off the event log
    for prev, row in zip(rows, rows[1:]):
        seen = [s for t, _, st in logged if prev["virtual_time"] < t <= row["virtual_time"] for s in st]
        assert row["updates"] == len(seen)
        if seen:
            assert row["staleness_mean"] == pytest.approx(np.mean(seen))
            assert row["staleness_max"] == max(seen)


def test_availability_and_concurrency_below_population():
    # FedBuff with C = 3 of 8 clients, Bernoulli availability: never more than C in flight,
    # and nobody is dispatched while unavailable
    cfg = async_config({"buffer_size": 2, "concurrency": 3}, n=8, budget=5.0)
    cfg["system"]["availability"] = {"name": "bernoulli", "p_on": 0.5, "period": 0.4}
    run = build(load_config(cfg))
    tr = Trace(lambda client, job: 1, keep_events=True)
    st = ScheduleState()
    engine = run.protocol.engine
    engine.start(st, tr)
    while not st.finished:
        engine.step(st, tr)
        assert len(st.flights) + len(st.parked) <= 3
    pop = run.ctx.population
    dispatches = [e for e in tr.events if e["kind"] == "dispatch"]
    assert len(dispatches) > 10
    for e in dispatches:
        assert e["client"] in pop.available(np.array([e["client"]]), e["time"])


@pytest.mark.parametrize(
    "protocol,key",
    [
        ({"concurrency": 9}, "protocol.concurrency"),
        ({"window": 0.5, "buffer_size": 2}, "protocol.buffer_size"),
        ({"buffer_size": 4, "concurrency": 2, "redispatch": "aggregation"}, "protocol.buffer_size"),
        ({"window": 1e-12}, "protocol.window"),
    ],
)
def test_impossible_schedules_are_config_errors(protocol, key):
    with pytest.raises(ConfigError) as err:
        build(load_config(async_config(protocol)))
    assert key in str(err.value)


# ---------------------------------------------------------------- large populations
@pytest.mark.parametrize("protocol", [
    {"concurrency": 7, "buffer_size": 3},  # slots refill one at a time, at once
    {"concurrency": 7, "buffer_size": 3, "redispatch": "aggregation", "max_staleness": 2},  # parked clients, discards
    {"concurrency": 12, "window": 0.3},  # several slots at a time
    {"concurrency": 40, "buffer_size": 5},  # every client busy: the idle ones all get a slot
])
def test_large_population_path_draws_the_same_clients(protocol):
    # from SPARSE_POPULATION clients on (when all are always available), idle clients are found
    # from the busy ones instead of by scanning everyone; it must draw exactly the same ones
    def events(sparse: bool) -> list[dict]:
        run = build(load_config(async_config(protocol, n=40, spread=90.0, budget=12.0)))
        engine = run.protocol.engine
        assert not engine.sparse  # 40 clients: the scan
        engine.sparse = sparse
        tr = Trace(lambda client, job: 1 + client % 3, keep_events=True)
        engine.run(ScheduleState(), tr)
        return tr.events

    dense, sparse = events(False), events(True)
    assert len([e for e in dense if e["kind"] == "dispatch"]) > 50
    assert sparse == dense


def test_the_large_population_path_needs_an_always_available_population(monkeypatch):
    import fedsim.protocols.async_engine as async_engine

    monkeypatch.setattr(async_engine, "SPARSE_POPULATION", 10)
    cfg = async_config({"concurrency": 3}, n=20)
    assert build(load_config(cfg)).protocol.engine.sparse
    cfg["system"]["availability"] = {"name": "bernoulli", "p_on": 0.5}
    assert not build(load_config(cfg)).protocol.engine.sparse


def test_a_run_on_the_large_population_path_equals_the_scan(monkeypatch):
    import torch

    import fedsim.protocols.async_engine as async_engine

    cfg = async_config({"concurrency": 5, "buffer_size": 2, "redispatch": "aggregation"}, n=16, budget=4.0)
    cfg["run"]["eval_every_time"] = 1.0
    scan = run_config(cfg)
    monkeypatch.setattr(async_engine, "SPARSE_POPULATION", 1)
    drawn = run_config(cfg)
    assert drawn.protocol.engine.sparse and not scan.protocol.engine.sparse
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in drawn.rows] == \
        [{k: v for k, v in r.items() if k != "wall_time"} for r in scan.rows]
    assert torch.equal(*(r.protocol.eval_params(r.ctx, r.final_state) for r in (scan, drawn)))
