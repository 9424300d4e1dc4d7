"""fedsim and ordinary Flower apps, in-process (`LocalGrid`: real messages, no processes).

* fedsim's ServerApp drives a Flower user's own ClientApp (tests/flower_user_app: its own
  model and data, Flower's message convention, no query handler): FedAvg gives the
  num-examples-weighted mean of the returned weights, round after round; SCAFFOLD with the
  client-side helper gives the paper's algorithm (c_i kept on the node, committed once
  accepted); FedBuff aggregates the buffered replies as its settings say.
* Flower's message convention in fedsim's ClientApp: it answers a plain train message (new
  weights + num-examples) and an evaluate message, so Flower's own strategies can drive it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsim.flower import deployment_config, run_on_grid
from fedsim.flower.settings import read_settings

from .conftest import ROOT
from .flower_local import LocalGrid
from .flower_user_app import user_client

USER_APP = ROOT / "tests" / "flower_user_app"
FEDAVG_APP = ROOT / "tests" / "flower_fedavg_app"
NAMES = ("1.weight", "1.bias")


def user_config(**changes) -> dict:
    cfg = yaml.safe_load((USER_APP / "fedsim.yaml").read_text())
    for section, value in changes.items():
        cfg[section] = {**cfg.get(section, {}), **value} if isinstance(value, dict) else value
    return cfg


def run_user_app(tmp_path: Path, cfg: dict, num_nodes: int, settings: dict | None = None, **grid):
    """Runs `cfg` through fedsim's ServerApp with the user's ClientApp on every node;
    returns (final model, events, the first model sent, grid)."""
    out = tmp_path / "flower"
    grid = LocalGrid(user_client.app, num_nodes, **grid)
    run_on_grid(grid, deployment_config(cfg), read_settings({**(settings or {}), "out-dir": str(out)}))
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    first = next(m for m in grid.pushed if m.metadata.message_type == "train")
    x0 = torch.cat([torch.from_numpy(first.content["arrays"][n].numpy()).flatten() for n in NAMES])
    return torch.load(out / "final_model.pt"), events, x0, grid


def user_local(x: torch.Tensor, partition: int, lr: float, steps: int, shift: torch.Tensor | None = None):
    """The user's training from flat model x (optionally with a gradient shift); returns (y, n)."""
    model = user_client.net()
    w, b = x[:200].reshape(10, 20), x[200:]
    model.load_state_dict({"1.weight": w, "1.bias": b})

    def add_shift(m):
        m[1].weight.grad.add_(shift[:200].reshape(10, 20))
        m[1].bias.grad.add_(shift[200:])

    data = user_client.load_data(partition)
    user_client.local_train(model, *data, lr, steps, add_shift if shift is not None else None)
    return torch.cat([model[1].weight.detach().flatten(), model[1].bias.detach()]), len(data[0])


def fedavg_reference(x: torch.Tensor, partitions, rounds: int, lr: float, steps: int) -> torch.Tensor:
    """FedAvg by hand: each round, the mean of the user's returned weights, weighted by num-examples."""
    for _ in range(rounds):
        ys, ns = zip(*(user_local(x, p, lr, steps) for p in partitions))
        x = sum(n * y for n, y in zip(ns, ys)) / sum(ns)
    return x


def scaffold_reference(x: torch.Tensor, partitions, rounds: int, lr: float, k: int) -> torch.Tensor:
    """SCAFFOLD by hand (Karimireddy et al., option II, full participation, weights by num-examples)."""
    n_clients = len(partitions)
    c, c_i = torch.zeros_like(x), {p: torch.zeros_like(x) for p in partitions}
    for _ in range(rounds):
        ys, ns, dcs = [], [], []
        for p in partitions:
            y, n = user_local(x, p, lr, k, shift=c - c_i[p])
            new = c_i[p] - c + (x - y) / (k * lr)
            ys.append(y), ns.append(n), dcs.append(new - c_i[p])
            c_i[p] = new
        x = x - sum(n * (x - y) for n, y in zip(ns, ys)) / sum(ns)
        c = c + sum(dcs) / n_clients
    return x


def test_fedavg_drives_an_ordinary_clientapp(tmp_path):
    cfg = user_config()
    final, events, x, grid = run_user_app(tmp_path, cfg, 2, settings={"label-smoothing": 0.0})
    # no query handler: the nodes serve clients 0, 1 in node order
    assert [e["client"] for e in events if e["kind"] == "dispatch"][:2] == [0, 1]
    sent = next(m for m in grid.pushed if m.metadata.message_type == "train").content["config"]
    assert (sent["lr"], sent["local-steps"], sent["server-round"]) == (0.1, 3, 1)
    assert sent["label-smoothing"] == 0.0  # the user's own run-config key reaches the ClientApp
    torch.testing.assert_close(final, fedavg_reference(x, range(2), 2, 0.1, 3), rtol=1e-5, atol=1e-6)


def user_evaluation(x: torch.Tensor, partitions) -> tuple[float, float]:
    """The user's evaluate handler by hand: loss and accuracy over the partitions, weighted by their sizes."""
    model = user_client.net()
    model.load_state_dict({"1.weight": x[:200].reshape(10, 20), "1.bias": x[200:]})
    parts = [user_client.load_data(p) for p in partitions]
    xs, ys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        out = model(xs)
    return float(torch.nn.functional.cross_entropy(out, ys)), float((out.argmax(1) == ys).float().mean())


def test_a_dataless_server_trains_an_ordinary_clientapp_and_evaluates_on_the_nodes(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the server built the config's dataset")

    monkeypatch.setattr("fedsim.runner.build_federated_data", no_data)
    settings = {"evaluation": "federated", "input-shape": "20", "num-classes": 10}
    final, _, x, grid = run_user_app(tmp_path, user_config(), 2, settings=settings)
    torch.testing.assert_close(final, fedavg_reference(x, range(2), 2, 0.1, 3), rtol=1e-5, atol=1e-6)
    rows = [json.loads(r) for r in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    loss, acc = user_evaluation(final, range(2))
    assert rows[-1]["federated_test_loss"] == rows[-1]["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert rows[-1]["federated_test_accuracy"] == pytest.approx(acc, abs=1e-6)
    evaluate = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert len(evaluate) == 2 * len(rows) and evaluate[-1].content["config"]["server-round"] == 2


def test_scaffold_with_the_client_helper_is_the_papers_algorithm(tmp_path):
    cfg = user_config(strategy={"name": "scaffold"}, run={"rounds": 3})
    final, _, x, grid = run_user_app(tmp_path, cfg, 2)
    torch.testing.assert_close(final, scaffold_reference(x, range(2), 3, 0.1, 3), rtol=1e-5, atol=1e-6)
    # c_i lives on the node, committed after each accepted job
    assert all("fedsim.state" in ctx.state for ctx in grid.contexts.values())


def test_fedbuff_drives_an_ordinary_clientapp(tmp_path):
    cfg = user_config(data={"num_clients": 3}, protocol={"name": "async", "buffer_size": 2, "concurrency": 2},
                      run={"rounds": 4})
    final, events, x0, _ = run_user_app(tmp_path, cfg, 3, delays={0: 0.3, 1: 0.0, 2: 0.05})
    merged = [e for e in events if e["kind"] == "aggregate"]
    assert len(merged) == 4 and all(len(e["jobs"]) == 2 for e in merged)
    assert most_in_flight(events) == 2  # concurrency 2
    assert not torch.equal(final, x0)


def most_in_flight(events: list[dict]) -> int:
    """Returns the most jobs that were in flight at once, from the events."""
    in_flight, most = 0, 0
    for e in events:
        in_flight += {"dispatch": 1, "arrival": -1}.get(e["kind"], 0)
        most = max(most, in_flight)
    return most


def test_a_reply_without_num_examples_stops_the_run_with_a_line(tmp_path):
    from flwr.app import MetricRecord
    from flwr.clientapp import ClientApp

    from fedsim.errors import FedsimError

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"loss": 1.0})}),
                       reply_to=msg)

    grid = LocalGrid(app, 2)
    with pytest.raises(FedsimError, match=r"client 0 \(job 0, node 1000\) sent a reply fedsim cannot read: .*'num-examples'"):
        run_on_grid(grid, deployment_config(user_config()), read_settings({"out-dir": str(tmp_path / "o")}))


def test_flowers_own_fedavg_drives_fedsims_clientapp(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from fedsim.config import load_config
    from fedsim.flower import client_app
    from fedsim.flower.records import record_to_vector, vector_to_record
    from fedsim.runner import build, execute

    path = FEDAVG_APP / "fedsim.yaml"  # one full-batch step per job: batch keys do not matter
    ref = execute(load_config(path), None, progress=False)
    layout = ref.ctx.task.layout
    x0 = build(load_config(path)).ctx.task.initial_params()
    grid = LocalGrid(client_app(config=path), 3)
    result = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3).start(
        grid=grid, initial_arrays=vector_to_record(x0, layout), num_rounds=2)
    final = record_to_vector(result.arrays, layout)
    torch.testing.assert_close(final, ref.protocol.eval_params(ref.ctx, ref.final_state), rtol=1e-5, atol=1e-6)
    # Flower's federated evaluation ran on fedsim's clients, weighted by their num-examples
    evaluated = result.evaluate_metrics_clientapp[2]
    assert set(evaluated) >= {"eval_loss", "eval_acc"} and 0 <= evaluated["eval_acc"] <= 1
    assert set(result.train_metrics_clientapp[1]) >= {"train_loss"}


def test_fedsims_clientapp_needs_its_own_config_for_flower_messages(tmp_path):
    from fedsim.errors import FedsimError
    from fedsim.flower import client_app

    app = client_app()
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(FedsimError, match="needs the node's own fedsim config: client_app\\(config=...\\)"):
        app(msg, ctx)
