"""Time-based evaluation (`run.eval_every_time`): the row at virtual time t holds the model
after exactly the rounds (aggregations) that ended by t — for every protocol."""
from __future__ import annotations

import json

import pytest

from .conftest import merge, quadratic_config, run_config

SPEEDS = {"compute": {"name": "linear", "slowest": 0.04, "spread": 5.0, "jitter": "exponential"},
          "dropout": {"name": "bernoulli", "p": 0.1}}
# protocol config, the event that ends a round in events.jsonl
CASES = {
    "sync": ({"protocol": {"name": "sync", "clients_per_round": 4}}, "aggregate"),
    "sync_deadline": ({"protocol": {"name": "sync", "clients_per_round": 4, "deadline": 0.7}}, "aggregate"),
    "async": ({"protocol": {"name": "async", "buffer_size": 2, "concurrency": 5}}, "aggregate"),
    "decentralized": ({"protocol": {"name": "decentralized"}, "strategy": {"name": "dfedavg"},
                       "topology": {"name": "ring"}}, "gossip"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_row_at_t_holds_the_rounds_ended_by_t(name, tmp_path):
    change, end_event = CASES[name]
    cfg = merge(quadratic_config(system=SPEEDS, run={"rounds": None, "time_budget": 8.0, "eval_every_time": 0.25,
                                                     "log_events": True}), change)
    run = run_config(cfg, tmp_path)
    ends = [e["time"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())
            if e["kind"] == end_event]
    assert len(ends) >= 6
    times = [r["virtual_time"] for r in run.rows]
    # the grid runs to the budget: the model stands from the last round's end until then
    assert times == [0.25 * k for k in range(len(times))] and times[-1] == 8.0
    assert [r["round"] for r in run.rows] == [sum(t <= r["virtual_time"] for t in ends) for r in run.rows]
    assert run.rows[-1]["round"] == run.final_state.rounds  # the last row is the final model


@pytest.mark.parametrize("name", ["sync", "decentralized"])
def test_a_run_stopped_by_rounds_ends_with_a_row_of_its_final_model(name):
    change, _ = CASES[name]
    cfg = merge(quadratic_config(system=SPEEDS, run={"rounds": 7, "eval_every_time": 0.25}), change)
    run = run_config(cfg)
    last = run.rows[-1]
    assert last["round"] == 7 and last["virtual_time"] * 4 % 1 != 0  # off the grid: the 7th round's end
    assert [r["virtual_time"] for r in run.rows[:-1]] == [0.25 * k for k in range(len(run.rows) - 1)]


@pytest.mark.parametrize("name,budget,every", [(name, 8.1, 0.25) for name in sorted(CASES)] + [("async", 3.0, 5.0)])
def test_a_budget_off_the_grid_ends_with_a_row_of_the_final_model_at_the_budget(name, budget, every, tmp_path):
    change, end_event = CASES[name]
    cfg = merge(quadratic_config(system=SPEEDS, run={"rounds": None, "time_budget": budget, "eval_every_time": every,
                                                     "log_events": True}), change)
    run = run_config(cfg, tmp_path)
    ends = [e["time"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())
            if e["kind"] == end_event]
    grid, last = [r["virtual_time"] for r in run.rows[:-1]], run.rows[-1]
    assert grid == [every * k for k in range(len(grid))] and grid[-1] < budget
    assert last["virtual_time"] == budget and last["round"] == len(ends) == run.final_state.rounds > 0
    assert last["aggregations"] == run.final_state.aggregations
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"] == last  # what the CLI's `final:` line shows
