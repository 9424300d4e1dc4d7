"""Asynchronous learning: Fraboni et al.'s update rule replayed exactly, the surrogate-objective
bias (docs/algorithms.md), FedFix = FedAvg at equal speeds, determinism and resumption."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedsim.clock import to_ticks
from fedsim.config import load_config
from fedsim.runner import build

from .conftest import quadratic_config, run_config


def async_quadratic(protocol: dict, n: int = 10, spread: float = 80.0, budget: float = 10.0, steps: int = 1,
                    lr: float = 0.05, **data) -> dict:
    """Deterministic quadratic clients ½ a_i‖x − b_i‖², F-`spread` job durations (slowest 1 s)."""
    return quadratic_config(
        data={"num_clients": n, **data},
        local={"steps": steps, "lr": lr},
        system={"compute": {"name": "linear", "slowest": 1.0 / steps, "spread": spread}},
        protocol={"name": "async", **protocol},
        run={"rounds": None, "time_budget": budget},
    )


class Recorder:
    """Stands in for events.jsonl: keeps every event in memory."""

    def __init__(self):
        self.events = []

    def write(self, time, kind, **fields):
        self.events.append((time, kind, json.dumps(fields, sort_keys=True)))

    def close(self):
        pass


def drive(run, state=None, until=None):
    """Steps a built run's protocol (from `state`, or from scratch) until finished or `until` steps."""
    ctx, proto = run.ctx, run.protocol
    st = proto.init(ctx) if state is None else state
    k = 0
    while not st.finished and (until is None or k < until):
        st = proto.step(ctx, st)
        k += 1
    return st


# ---------------------------------------------------------------- the update rule, replayed
@pytest.mark.parametrize(
    "protocol",
    [{}, {"buffer_size": 3, "redispatch": "aggregation"}, {"window": 0.3, "weighting": "unbiased"},
     {"buffer_size": 2, "concurrency": 4}],
)
def test_deltas_from_the_received_model_added_to_the_current_one(protocol):
    # x^{n+1} = x^n − Σ_{i∈S_n} d_i u_i(x^{ρ_i(n)}), with u_i(z) = (1 − (1 − η a_i)^K)(z − b_i)
    # for K full-batch steps on ½ a_i‖x − b_i‖² — replayed from the event log alone.
    eta, k = 0.05, 3
    run = build(load_config(async_quadratic(protocol, n=6, budget=4.0, steps=k, lr=eta)))
    run.ctx.events = rec = Recorder()
    st = drive(run)
    info = run.ctx.task.info
    a, b = info["curvature"], info["centers"]
    p, f = run.protocol._p, run.protocol._f
    models = [np.zeros_like(b[0])]
    for _, kind, fields in rec.events:
        if kind != "aggregate":
            continue
        ev = json.loads(fields)
        x = models[-1].copy()
        for c, s in zip(ev["clients"], ev["staleness"]):
            base = models[len(models) - 1 - s]
            d = p[c] / f[c] if f is not None else 1.0 / len(ev["clients"])
            x -= d * (1 - (1 - eta * a[c]) ** k) * (base - b[c])
        models.append(x)
    assert len(models) == st.aggregations + 1 > 5
    final = run.protocol.eval_params(run.ctx, st).numpy()
    assert np.abs(final - models[-1]).max() < 1e-12


def test_only_referenced_models_are_kept():
    run = build(load_config(async_quadratic({"buffer_size": 3}, budget=6.0)))
    ctx, proto = run.ctx, run.protocol
    st = proto.init(ctx)
    while not st.finished:
        st = proto.step(ctx, st)
        referenced = {f.version for f in st.flights.values()} | {u.version for u in st.buffer}
        assert set(st.models) == referenced
        assert len(st.results) <= len(st.flights) + len(st.buffer)


# ---------------------------------------------------------------- bias (docs/algorithms.md)
def time_average(run, start: float, every: float = 0.05) -> np.ndarray:
    """Runs to the budget and returns the model averaged on a virtual-time grid from `start`."""
    ctx, proto = run.ctx, run.protocol
    st = proto.init(ctx)
    grid, end, xs = to_ticks(start), ctx.budget_ticks(), []
    while not st.finished:
        nt = proto.next_time(ctx, st)
        while nt is not None and nt > grid <= end:
            xs.append(proto.eval_params(ctx, st).clone())
            grid += to_ticks(every)
        st = proto.step(ctx, st)
    while grid <= end:
        xs.append(proto.eval_params(ctx, st).clone())
        grid += to_ticks(every)
    return torch.stack(xs).mean(0).numpy()


@pytest.mark.slow
def test_async_fedavg_bias_toward_fast_clients_and_its_corrections():
    # Equal curvatures (f_i = ½‖x − b_i‖², as in §1.9) so that the schedule is the only source
    # of bias; K = 1 so that there is no client drift. With heterogeneous τ_i the identical
    # weights favour fast clients: the limit is Σ q_i b_i with q_i ∝ 1/τ_i; the "weight"
    # variants (p_i / f_i) and FedFix reach the true optimum Σ b_i / N. The iterates circle
    # their limit at a distance O(η) (stale updates), hence the time average and tolerances
    # that are fractions of the bias |x_q − x*| being tested.
    def tail(protocol):
        cfg = async_quadratic(protocol, budget=40.0, lr=0.08, curvature_min=1.0, curvature_max=1.0)
        run = build(load_config(cfg))
        return run, time_average(run, start=20.0)

    run, x_identical = tail({})
    b, x_star = run.ctx.task.info["centers"], run.ctx.task.info["optimum"]
    tau = 1.0 - np.arange(10) * 0.8 / 9
    q = (1 / tau) / (1 / tau).sum()
    x_q = q @ b
    gap = np.linalg.norm(x_q - x_star)
    assert gap > 0.5
    assert np.linalg.norm(x_identical - x_q) < 0.05 * gap
    for protocol in ({"weighting": "unbiased"}, {"window": 0.2, "weighting": "unbiased"},
                     {"window": 0.5, "weighting": "unbiased"}):
        _, x = tail(protocol)
        assert np.linalg.norm(x - x_star) < 0.1 * gap, protocol
    # FedBuff-5 with identical weights 1/c: biased to its own participation frequencies f_i
    run, x_buff = tail({"buffer_size": 5, "redispatch": "aggregation"})
    f = run.protocol.schedule_frequencies(run.ctx)
    assert np.linalg.norm(x_buff - (f / f.sum()) @ b) < 0.1 * gap
    assert np.linalg.norm(x_buff - x_star) > gap


# ---------------------------------------------------------------- equivalences with sync FedAvg
@pytest.mark.parametrize(
    "protocol", [{"window": 1.0, "weighting": "unbiased"}, {"buffer_size": 10, "redispatch": "aggregation"}]
)
def test_equal_speeds_fedfix_and_full_buffer_are_synchronous_fedavg(protocol):
    # F-0 (every job lasts 1 s), Δt = 1: every client in every window, staleness 0, d_i = p_i
    common = dict(
        data={"num_clients": 10}, local={"steps": 10, "lr": 0.05},
        system={"compute": {"name": "constant", "step_time": 0.1}},
        run={"rounds": None, "time_budget": 12.0, "eval_every_time": 1.0},
    )
    sync = run_config(quadratic_config(**common, protocol={"name": "sync", "weighting": "identical"}))
    asyn = run_config(quadratic_config(**common, protocol={"name": "async", "client_weights": "uniform", **protocol}))
    assert asyn.final_state.aggregations == sync.final_state.aggregations == 12
    x_sync = sync.protocol.eval_params(sync.ctx, sync.final_state)
    x_async = asyn.protocol.eval_params(asyn.ctx, asyn.final_state)
    assert torch.equal(x_sync, x_async)
    # curves against virtual time are exact: the row at t = k s holds the k aggregations done by then
    assert [(r["virtual_time"], r["aggregations"]) for r in asyn.rows] == [(float(k), k) for k in range(13)]
    assert [(r["virtual_time"], r["aggregations"]) for r in sync.rows] == [(float(k), k) for k in range(13)]


# ---------------------------------------------------------------- determinism and resumption
def noisy_config(seed: int = 3) -> dict:
    """Every source of randomness on: batches, per-job jitter, availability, dropout, dispatch draws."""
    cfg = async_quadratic({"buffer_size": 3, "concurrency": 5, "max_staleness": 4}, n=8, budget=6.0,
                          steps=4, samples_per_client=20, noise_std=1.0)
    cfg["seed"] = seed
    cfg["local"]["batch_size"] = 4
    cfg["system"]["compute"]["jitter"] = "exponential"
    cfg["system"]["availability"] = {"name": "bernoulli", "p_on": 0.7, "period": 0.5}
    cfg["system"]["dropout"] = {"name": "bernoulli", "p": 0.15}
    cfg["system"]["link"] = {"name": "constant", "bandwidth_down": 2000.0, "bandwidth_up": 500.0, "latency": 0.01}
    cfg["run"].update({"log_events": True, "eval_every_time": 0.5})
    return cfg


def test_same_seed_same_events_and_metrics(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_config(noisy_config(seed), tmp_path / name)
    events = {n: (tmp_path / n / "events.jsonl").read_text() for n in "abc"}
    assert events["a"] == events["b"]
    assert events["a"] != events["c"]
    kinds = {json.loads(line)["kind"] for line in events["a"].splitlines()}
    assert {"dispatch", "arrival", "aggregate", "drop"} <= kinds

    def metrics(n):
        rows = [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]

    assert metrics("a") == metrics("b")


def test_resuming_from_a_copied_state_gives_the_same_events_and_model():
    cfg = load_config(noisy_config())
    full = build(cfg)
    full.ctx.events = rec_full = Recorder()
    st_full = drive(full)

    first = build(cfg)
    first.ctx.events = rec = Recorder()
    st = drive(first, until=60)
    assert not st.finished
    saved_state, saved_store = copy.deepcopy(st), copy.deepcopy(first.ctx.store)
    del first  # the executor and its pending jobs are gone

    second = build(cfg)  # a fresh process: new executor, protocol set up again
    second.ctx.events = rec
    second.ctx.store = saved_store
    st2 = drive(second, state=saved_state)
    assert rec.events == rec_full.events
    assert st2.aggregations == st_full.aggregations
    assert torch.equal(second.protocol.eval_params(second.ctx, st2), full.protocol.eval_params(full.ctx, st_full))


# ---------------------------------------------------------------- staleness cut and lost jobs
def test_max_staleness_discards_and_frees_the_slot():
    run = build(load_config(async_quadratic({"max_staleness": 2}, n=4, spread=75.0, budget=3.0)))
    run.ctx.events = rec = Recorder()
    st = drive(run)
    events = [(t, kind, json.loads(f)) for t, kind, f in rec.events]
    arrivals = [e for _, kind, e in events if kind == "arrival"]
    discards = [e for _, kind, e in events if kind == "discard"]
    assert discards and [d["job"] for d in discards] == [a["job"] for a in arrivals if a["staleness"] > 2]
    assert all(s <= 2 for _, kind, e in events if kind == "aggregate" for s in e["staleness"])
    assert st.discarded == len(discards)
    # each discarded client starts again at once, from the current model
    for t, kind, e in events:
        if kind == "discard":
            assert (t, "dispatch", e["client"]) in {(t2, k2, e2.get("client")) for t2, k2, e2 in events}


def test_lost_jobs_never_arrive_and_their_slot_is_refilled():
    cfg = async_quadratic({}, n=6, budget=8.0)
    cfg["system"]["dropout"] = {"name": "bernoulli", "p": 0.3}
    run = build(load_config(cfg))
    run.ctx.events = rec = Recorder()
    st = drive(run)
    events = [(t, kind, json.loads(f)) for t, kind, f in rec.events]
    lost = {e["job"] for _, kind, e in events if kind == "drop"}
    arrived = {e["job"] for _, kind, e in events if kind == "arrival"}
    assert lost and not lost & arrived
    assert st.dropped == len(lost)
    in_flight = 0
    for t, kind, _ in events:
        in_flight += {"dispatch": 1, "arrival": -1, "drop": -1}.get(kind, 0)
        assert 0 <= in_flight <= 6


def test_an_aggregation_accepts_its_rows_at_once_as_one_by_one(monkeypatch):
    # every client in flight and a buffer of 15 > 10 clients: each aggregation holds some
    # client's updates twice. Accepting the buffer's rows at once (the protocol's way) must
    # leave the model, the clients' states (EF21's h_i) and the server's memory of them
    # exactly as accepting them one by one, in buffer order
    from fedsim.protocols.base import RunContext

    cfg = quadratic_config(
        strategy={"name": "compressed", "compressor": {"name": "topk", "ratio": 0.4}, "feedback": "ef21"},
        protocol={"name": "async", "buffer_size": 15},
        system={"compute": {"name": "lognormal", "mean": 1.0, "sigma": 1.0}},
        run={"rounds": 6, "eval_every": 6},
    )
    at_once = run_config(cfg)
    real = RunContext.accept
    seen: list[list[int]] = []

    def one_by_one(self, contribs, memory=None):
        seen.append(contribs.senders.tolist())
        for i in range(len(contribs)):
            real(self, contribs.row(i), {k: v[i : i + 1] for k, v in (memory or {}).items()})

    monkeypatch.setattr(RunContext, "accept", one_by_one)
    alone = run_config(cfg)
    assert len(seen) == 6 and all(len(set(s)) < len(s) for s in seen)  # repeated senders in every aggregation
    assert torch.equal(at_once.protocol.eval_params(at_once.ctx, at_once.final_state),
                       alone.protocol.eval_params(alone.ctx, alone.final_state))
    for c in range(10):
        a, b = at_once.ctx.store.get(c), alone.ctx.store.get(c)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ma, mb = at_once.ctx.memory.get(c), alone.ctx.memory.get(c)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
