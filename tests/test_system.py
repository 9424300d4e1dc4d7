"""Client system profiles: speeds, transfer time, availability, dropout, and the round deadline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim import rng
from fedsim.system.models import SystemContext, markov_availability
from fedsim.system.population import Population

from .conftest import quadratic_config, run_config


def population(**system):
    cfg = load_config(quadratic_config(system=system))
    return Population.build(cfg.system, 5, 0)


def test_linear_schedule_is_fraboni_f80():
    p = population(compute={"name": "linear", "slowest": 1.0, "spread": 80})
    assert np.allclose(p.step_time(np.arange(5)), [1.0, 0.8, 0.6, 0.4, 0.2])


def test_job_time_is_compute_plus_transfer():
    p = population(compute={"name": "constant", "step_time": 0.5},
                   link={"name": "constant", "bandwidth_down": 100.0, "bandwidth_up": 10.0, "latency": 0.25})
    # 4 steps × 0.5 + 2 × 0.25 latency + 1000/100 down + 50/10 up = 2 + 0.5 + 10 + 5
    assert p.job_seconds([0], [4], [1000], [50], [0])[0] == pytest.approx(17.5)


def test_lognormal_speeds_keep_the_mean():
    cfg = load_config(quadratic_config(system={"compute": {"name": "lognormal", "mean": 2.0, "sigma": 0.5}}))
    p = Population.build(cfg.system, 100_000, 0)
    assert p.step_time(np.arange(100_000)).mean() == pytest.approx(2.0, rel=0.02)


def test_one_client_s_step_time_is_its_batch_answer_asked_alone_or_again():
    cfg = load_config(quadratic_config(system={"compute": {"name": "lognormal", "mean": 2.0, "sigma": 0.5}}))
    p = Population.build(cfg.system, 1000, 0)
    ids = np.array([0, 17, 999])
    batch = p.step_time(ids)
    for _ in range(2):  # the second time from memory
        alone = [p.step_time(np.array([i])) for i in ids] + [p.step_time(int(i)) for i in ids]
        assert [a.shape for a in alone] == [(1,)] * 3 + [()] * 3
        assert np.array_equal(np.concatenate([a.reshape(1) for a in alone]), np.concatenate([batch, batch]))


def test_exponential_jitter_has_mean_one_and_is_per_job():
    p = population(compute={"name": "constant", "step_time": 1.0, "jitter": "exponential"})
    f = p.jitter_factor(np.arange(100_000))
    assert f.mean() == pytest.approx(1.0, rel=0.02)
    assert p.jitter_factor(np.array([7]))[0] == f[7]


def test_bernoulli_availability_rate_and_slots():
    p = population(availability={"name": "bernoulli", "p_on": 0.3, "period": 2.0})
    ids = np.arange(50_000)
    on = len(p.available(ids, 0.5)) / len(ids)
    assert on == pytest.approx(0.3, abs=0.01)
    assert np.array_equal(p.available(ids, 0.5), p.available(ids, 1.9))  # same slot
    assert not np.array_equal(p.available(ids, 0.5), p.available(ids, 2.1))
    assert p.next_availability_change(0.5) == 2.0


def test_markov_availability_stationary_share():
    p = population(availability={"name": "markov", "p_on_off": 0.2, "p_off_on": 0.2, "period": 1.0})
    ids = np.arange(4000)
    assert len(p.available(ids, 10.0)) / len(ids) == pytest.approx(0.5, abs=0.04)


def _markov_chain_one_by_one(seed, p_on_off, p_off_on, client, slot):
    """A client's Markov availability at `slot`, walked from its stationary start one slot at a time."""
    on = bool(rng.uniform(seed, "availability/init", client) < p_off_on / (p_on_off + p_off_on))
    for s in range(1, slot + 1):
        u = float(rng.uniform(seed, "availability/step", client, s))
        on = (u >= p_on_off) if on else (u < p_off_on)
    return on


# with p_on_off = p_off_on a draw never sets the state regardless of the last one (it flips or
# keeps it), so the chain never forgets: a slot walked twice or skipped changes the answer
@pytest.mark.parametrize("p_on_off,p_off_on", [(0.3, 0.3), (0.2, 0.3), (0.9, 0.05)])
def test_markov_availability_is_each_client_s_own_chain_whatever_is_asked(p_on_off, p_off_on):
    # queries of many clients at once, of one client, out of time order and with repeats all
    # give each client's chain walked slot by slot from its start
    model = markov_availability(SystemContext(30, 7), p_on_off=p_on_off, p_off_on=p_off_on, period=0.5)
    gen = np.random.default_rng(0)
    asked = [(np.arange(10), 3.2), (np.arange(10, 20), 1.0), (np.arange(35), 12.7)]  # walked from different slots
    asked += [(gen.choice(35, size=int(gen.integers(1, 40)), replace=True), t)  # 30-34: beyond the population
              for t in [0.0, 3.2, 3.3, 1.0, 12.7, 12.9, 0.2, 40.0, 7.5]]
    for ids, t in asked:
        got = model.available(ids, t)
        want = [_markov_chain_one_by_one(7, p_on_off, p_off_on, int(i), int(t // 0.5)) for i in ids]
        assert got.tolist() == want, t


def test_deadline_cuts_exactly_the_slow_clients(tmp_path):
    # 5 clients, F-80 speeds per step: 1.0, 0.8, 0.6, 0.4, 0.2 s; 10 steps each → 10, 8, 6, 4, 2 s.
    cfg = quadratic_config(
        data={"num_clients": 5},
        system={"compute": {"name": "linear", "slowest": 1.0, "spread": 80}},
        protocol={"name": "sync", "deadline": 7.0},
        run={"rounds": 3, "eval_every": 1, "log_events": True},
    )
    run = run_config(cfg, tmp_path / "run")
    last = run.rows[-1]
    assert last["stragglers"] == 2 * 3 and last["participants"] == 3
    assert last["virtual_time"] == pytest.approx(21.0)  # every round ends at the deadline
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    aggs = [e for e in events if e["kind"] == "aggregate"]
    assert [a["clients"] for a in aggs] == [[4, 3, 2]] * 3  # arrival order: fastest first
    assert [e["client"] for e in events if e["kind"] == "straggler"][:2] == [1, 0]


def test_time_budget_stops_before_a_round_that_would_overrun():
    cfg = quadratic_config(
        data={"num_clients": 5},
        system={"compute": {"name": "linear", "slowest": 1.0, "spread": 80}},
        run={"rounds": None, "time_budget": 35.0, "eval_every": 1},
    )
    cfg["run"].pop("rounds")
    run = run_config(cfg)
    assert run.final_state.rounds == 3  # rounds of 10 s: the 4th would end at 40 > 35
    assert run.rows[-1]["virtual_time"] == pytest.approx(30.0)


@pytest.mark.parametrize("system", [
    {"compute": {"name": "lognormal", "mean": 0.3, "sigma": 1.0}},
    {"compute": {"name": "lognormal", "mean": 0.3, "sigma": 1.0, "jitter": "exponential"}, "link": {"name": "lognormal"}},
    {"compute": {"name": "linear", "jitter": "lognormal", "jitter_sigma": 0.7}, "link": {"name": "constant"}},
])
def test_one_job_s_duration_is_its_batch_answer_bit_for_bit(system):
    cfg = load_config(quadratic_config(system=system))
    p = Population.build(cfg.system, 50, 4)
    clients, steps = np.arange(50) % 13, np.arange(50) % 7 + 1
    down, up, jobs = np.arange(50) * 12_345 + 1, np.arange(50) * 777, np.arange(50) * 3 + 11
    batch = p.job_seconds(clients, steps, down, up, jobs)
    for i in range(50):  # twice per client: the second from the remembered step time
        alone = p.job_seconds_one(int(clients[i]), int(steps[i]), int(down[i]), int(up[i]), int(jobs[i]))
        assert isinstance(alone, float) and alone == batch[i]
