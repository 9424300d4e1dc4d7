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


FT = ("client_acc_ft_mean", "client_acc_ft_std", "client_acc_ft_p10", "client_acc_ft_min")


def test_fine_tuning_personalises_clients_that_each_hold_one_class():
    """One class per client: one round leaves the global model poor on most clients, a few
    local steps on a client's own data make it predict that client's class."""
    cfg = digits_config(data={"client_test_fraction": 0.25, "client_finetune_steps": 3, "client_finetune_lr": 0.5},
                        run={"rounds": 1, "eval_every": 1}, local={"lr": 0.05, "steps": 2})
    cfg["data"] = {**cfg["data"], "num_clients": 5, "partition": {"name": "classes_per_client", "k": 1}}
    run = run_config(cfg)
    row = run.rows[-1]
    assert set(COLUMNS) <= set(row) and set(FT) <= set(row)
    assert row["client_acc_mean"] < 0.5 and row["client_acc_ft_min"] > 0.9
    final = run.protocol.eval_params(run.ctx, run.final_state)
    again = run.client_eval.row(run.ctx.task, final, None, 64, at=7)  # keyed: the same draws for the same time
    assert again == run.client_eval.row(run.ctx.task, final, None, 64, at=7)
    assert {k: again[k] for k in COLUMNS} == {k: row[k] for k in COLUMNS}  # fine-tuning leaves the model as it was


def test_fine_tuning_without_client_test_data_is_a_config_error():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="data.client_finetune_steps: fine-tunes for the per-client evaluation"):
        run_config(digits_config(data={"client_finetune_steps": 2}, run={"rounds": 1}))
