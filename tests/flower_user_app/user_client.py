"""A Flower user's own ClientApp, quickstart style: its own model, its own data (made from
its partition-id), Flower's message convention — nothing of fedsim but, for SCAFFOLD, the
client-side helper `fedsim.flower.scaffold_client`."""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsim.flower import scaffold_client

DIM, CLASSES = 20, 10
app = ClientApp()


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(DIM, CLASSES))


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's data: exists only here (its size differs from any server-side partition)."""
    teacher = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(0))
    x = torch.randn(25 + 15 * partition_id, DIM, generator=torch.Generator().manual_seed(100 + partition_id))
    return x, (x @ teacher).argmax(1)


def local_train(model: nn.Module, x, y, lr: float, steps: int, on_grad=None, smoothing: float = 0.0) -> float:
    """`steps` full-batch SGD steps; `on_grad(model)` runs after each backward pass."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)
        loss.backward()
        if on_grad is not None:
            on_grad(model)
        opt.step()
    return float(loss.detach())


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    cfg = msg.content["config"]
    lr, steps = float(cfg["lr"]), int(cfg.get("local-steps", 1))
    x, y = load_data(int(context.node_config["partition-id"]))
    control = scaffold_client.start(msg, context) if scaffold_client.sent_by_scaffold(msg) else None
    smoothing = float(cfg.get("label-smoothing", 0.0))  # the app's own run-config key
    loss = local_train(model, x, y, lr, steps, control.correct if control else None, smoothing)
    extras = control.finish(model, steps, lr) if control else {}
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(x), "num-steps": steps})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, **extras}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]))
    with torch.no_grad():
        out = model(x)
    metrics = {"eval_loss": float(nn.functional.cross_entropy(out, y)),
               "eval_acc": float((out.argmax(1) == y).float().mean()), "num-examples": len(x)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
