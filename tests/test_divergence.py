"""Divergence without NaN updates: a test loss that stays far above its initial value, or
that is infinite, stops the run with exit status 3 (fedsim.divergence)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.config.schema import RunSection
from fedsim.divergence import chance_accuracy, diverged
from fedsim.outputs import JsonlLog, read_jsonl

from .conftest import digits_config, merge, quadratic_config

# the cases on the small digits MLP: each ends at chance accuracy with finite updates
BLOWN_UP = {
    "sync, lr 100": {"local": {"lr": 100.0}},
    "async, lr 100": {"local": {"lr": 100.0}, "protocol": {"name": "async"}},
    "sync, server_lr 1e6": {"strategy": {"name": "fedavg", "server_lr": 1e6}},
    "decentralized, lr 100": {"local": {"lr": 100.0}, "protocol": "decentralized", "strategy": "dfedavg"},
    "async_gossip, lr 1e4": {"local": {"lr": 1e4}, "protocol": {"name": "async_gossip", "init": "shared"},
                             "strategy": "gossip"},
}


@pytest.mark.parametrize("case", sorted(BLOWN_UP))
def test_a_loss_far_above_its_start_exits_3(case, tmp_path, tmp_yaml, capsys):
    cfg = merge(digits_config(run={"rounds": 8, "eval_every": 2, "checkpoint_every": 1}), BLOWN_UP[case])
    if cfg["protocol"] != "decentralized" and cfg["protocol"]["name"] != "sync":
        del cfg["protocol"]["clients_per_round"]
    out = tmp_path / "run"
    code = main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    rows = read_jsonl(out / "metrics.jsonl")
    initial = rows[0]["test_loss"]
    # digits' test set: 37 of 359 in its largest class, so chance level is 0.103 + (1 − 0.103) / 10
    assert (f"the test loss has stayed above 4 × its initial {initial:.4g} at chance accuracy (≤ 0.193) for 3 "
            "evaluations") in err
    assert all(r["test_loss"] > 4 * initial and r["test_accuracy"] <= 0.193 for r in rows[-3:]) and len(rows) <= 5
    good = [r for r in rows if r["test_loss"] <= 4 * initial][-1]
    assert f"last good metrics: {{'round': {good['round']}, " in err and "(last checkpoint kept)" in err
    assert not (out / "summary.json").exists() and not (out / "final_model.pt").exists()


def test_the_rule_can_be_turned_off_or_loosened(tmp_path, tmp_yaml, capsys):
    cfg = merge(digits_config(run={"rounds": 4, "eval_every": 1}), BLOWN_UP["sync, lr 100"])
    for run in ({"divergence_factor": None}, {"divergence_evals": 5}):
        assert main(["run", str(tmp_yaml(merge(cfg, {"run": run}))), "--out", str(tmp_path / str(run)),
                     "--quiet"]) == 0, capsys.readouterr().err


def test_an_infinite_test_loss_is_written_as_null_and_exits_3(tmp_path, tmp_yaml, capsys):
    # float64 quadratic: the loss (a square) overflows long before the parameters or updates do
    cfg = quadratic_config(local={"lr": 1.0}, run={"rounds": 400, "eval_every": 5, "divergence_factor": None})
    out = tmp_path / "run"
    code = main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3, err
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_loss"] is None and "1e+308" not in (out / "metrics.jsonl").read_text()
    assert f"the test loss is inf (round {last['round']}, virtual time" in err
    before = read_jsonl(out / "metrics.jsonl")[-2]
    assert f"last finite metrics: {{'round': {before['round']}, " in err and math.isfinite(before["test_loss"])


def test_json_rows_hold_null_for_nan_and_infinities(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    log.append({"a": float("inf"), "b": -float("inf"), "c": float("nan"), "d": [1.5, float("inf")]})
    log.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"a": None, "b": None, "c": None, "d": [1.5, None]}


def _rows(*losses, acc=None):
    accs = acc if acc is not None else [None] * len(losses)
    return [{"round": i, "virtual_time": float(i), "test_accuracy": a, "test_loss": x}
            for i, (x, a) in enumerate(zip(losses, accs))]


RULE = RunSection(divergence_factor=4.0, divergence_evals=3)  # the defaults


def test_the_rule_needs_the_whole_streak_above_the_factor():
    assert diverged(_rows(2.0, 9.0, 9.0), RULE, None) is None  # too few evaluations
    assert diverged(_rows(2.0, 9.0, 9.0, 7.9, 9.0), RULE, None) is None  # 7.9 ≤ 4 × 2: the streak breaks
    assert diverged(_rows(2.0, 0.5, 30.0, 30.0), RULE, None) is None
    found = diverged(_rows(2.0, 0.5, 8.0, 30.0, 9.0, 8.5), RULE, None)
    assert found is not None and found.last["round"] == 2 and found.label == "last good metrics"
    assert "above 4 × its initial 2 for 3 evaluations (now 8.5, round 5" in found.what
    assert diverged(_rows(2.0, 0.5, 8.0, 30.0, 9.0, 8.5), RunSection(divergence_factor=None), None) is None
    assert diverged(_rows(0.0, 5.0, 5.0, 5.0, 5.0), RULE, None) is None  # no scale to compare with
    assert diverged(_rows(-1.0, 5.0, 5.0, 5.0, 5.0), RULE, None) is None
    assert diverged(_rows(2.0, None, None, None, None), RULE, None) is None  # a task without a test loss


def test_a_high_loss_counts_only_at_chance_accuracy():
    chance = chance_accuracy(np.repeat(np.arange(10), 10))  # ten equal classes: 0.1 + 0.09
    assert chance == pytest.approx(0.19)
    # Fraboni et al.'s asynchronous FedAvg with a large step: a loss 10-17 × the initial one for
    # many evaluations while the accuracy climbs (experiments/papers/fedfix, lr 0.03)
    learning = _rows(2.3, 3.3, 18.0, 20.2, 29.9, 32.0, 31.5, acc=[0.11, 0.34, 0.29, 0.36, 0.43, 0.22, 0.22])
    assert diverged(learning, RULE, chance) is None
    assert diverged(learning, RULE, None) is not None  # the loss alone would stop it
    stuck = _rows(2.3, 3.3, 18.0, 20.2, 29.9, acc=[0.11, 0.34, 0.10, 0.19, 0.103])
    found = diverged(stuck, RULE, chance)
    assert found is not None and found.last["round"] == 1
    assert "at chance accuracy (≤ 0.19) for 3 evaluations" in found.what


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_loss_diverges_at_once_even_with_the_rule_off(bad):
    found = diverged(_rows(2.0, 1.0, bad), RunSection(divergence_factor=None), None)
    assert found is not None and found.last["round"] == 1 and found.label == "last finite metrics"
    assert found.what.startswith(f"the test loss is {bad} (round 2, virtual time 2 s)")
