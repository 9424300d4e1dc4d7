"""Workload W as a Flower ClientApp, written the way a Flower user would (for vs_flower.py).

The ClientApp is defined at module level and loads the data once per process, from a
module-level cache: Flower's Ray backend pickles the app with every message it sends to a
client actor, so an app whose function captured the training set in a closure would ship
it every time (≈ 2 MB per client update here). Imported by reference, the app pickles to a
few hundred bytes. The client trains on fedsim's keyed batch order, from the weights the
server sent, with ``torch.optim.SGD`` — the same steps as fedsim's executors.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

LR, BATCH = 0.05, 16
_CACHE: dict[str, Any] = {}


def workload(rounds: int = 20) -> dict[str, Any]:
    """Returns (once per process) workload W's data, partition, task and seed."""
    if not _CACHE:
        from benchmarks._workload import workload_w
        from fedsim.config import load_config
        from fedsim.data import build_federated_data
        from fedsim.task import build_task

        cfg = load_config(workload_w(rounds))
        data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
        _CACHE.update(data=data, task=build_task(cfg.model, data.source, cfg.seed), seed=cfg.seed)
    return _CACHE


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch of SGD for the client ``partition-id`` from the received weights."""
    from fedsim.data.batching import job_indices
    from fedsim.rng import numpy_rng

    w = workload()
    data, seed = w["data"], w["seed"]
    model = copy.deepcopy(w["task"].module)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    cid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"]) - 1
    n = data.num_clients
    part = data.client_train[cid]
    idx = job_indices(part, BATCH, 1, None, "epoch", False, numpy_rng(seed, "batches", cid, rnd * n + cid))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for row in idx:
        row = row[row >= 0]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train[row]), data.y_train[row]).backward()
        opt.step()
    metrics = MetricRecord({"num-examples": len(part)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
