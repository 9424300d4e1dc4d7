"""Per-client evaluation: client_acc_* columns from each client's own test data (server and gossip)."""
from __future__ import annotations

import numpy as np
import pytest

from fedsim.client_eval import summarise

from .conftest import digits_config, run_config
from .test_decentralized import dec_config

COLUMNS = ("client_acc_mean", "client_acc_std", "client_acc_p10", "client_acc_min")


def test_summary_of_known_accuracies():
    s = summarise(np.array([0.0, 0.5, 1.0, 1.0]))
    assert s == {"client_acc_mean": 0.625, "client_acc_std": pytest.approx(np.sqrt(0.171875)),
                 "client_acc_p10": pytest.approx(0.15), "client_acc_min": 0.0}


def own_accuracies(run, models):
    """Each client's accuracy of models[i] on its own test data, through Task.evaluate."""
    data, task = run.ctx.data, run.ctx.task
    return np.array([task.evaluate(models[i], *data.client_test_data(i))["accuracy"] for i in range(data.num_clients)])


def test_server_protocol_rows_hold_the_global_models_accuracy_on_each_clients_test_data():
    run = run_config(digits_config(data={"client_test_fraction": 0.25}, run={"rounds": 2, "eval_every": 1}))
    data = run.ctx.data
    train_sizes = data.samples_per_client()
    held = np.array([len(t) for t in data.client_test])
    assert (held == np.maximum(1, np.round((train_sizes + held) * 0.25))).all()
    assert all(set(COLUMNS) <= set(r) for r in run.rows)
    final = run.protocol.eval_params(run.ctx, run.final_state)
    want = summarise(own_accuracies(run, [final] * data.num_clients))
    assert {k: run.rows[-1][k] for k in COLUMNS} == pytest.approx(want)


def test_gossip_rows_hold_each_nodes_accuracy_on_its_own_test_data():
    run = run_config(dec_config(data={"client_test_fraction": 0.25}, strategy={"name": "dfedavg"},
                                protocol={"name": "decentralized", "init": "independent"}))
    models = run.final_state.models
    want = summarise(own_accuracies(run, models))
    assert {k: run.rows[-1][k] for k in COLUMNS} == pytest.approx(want)
    average = summarise(own_accuracies(run, [models.mean(0)] * len(models)))
    assert want != pytest.approx(average)  # the node models, not their average


def test_no_client_test_data_no_columns():
    run = run_config(digits_config(run={"rounds": 1}))
    assert not set(COLUMNS) & set(run.rows[-1])


@pytest.mark.parametrize("cfg", [digits_config(run={"rounds": 2}), dec_config()], ids=["sync", "decentralized"])
def test_vmap_executor_gives_the_serial_columns(cfg):
    from .conftest import merge

    cfg = merge(cfg, {"data": {"client_test_fraction": 0.25}})
    a = run_config(cfg)
    b = run_config(merge(cfg, {"executor": {"kind": "vmap", "device": "cpu"}}))
    for ra, rb in zip(a.rows, b.rows):
        assert {k: rb[k] for k in COLUMNS} == pytest.approx({k: ra[k] for k in COLUMNS}, abs=1e-9)
