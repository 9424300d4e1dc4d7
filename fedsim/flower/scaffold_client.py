"""SCAFFOLD's client part for your own Flower ClientApp (fedsim's ``scaffold`` on the server).

A stateless fedsim strategy (FedAvg, FedBuff, FedFix, FedProx's server, …) needs nothing
from a ClientApp beyond Flower's convention: read ``msg.content["arrays"]``, train, reply
with ``"arrays"`` (the new weights) and ``"metrics"`` (with ``num-examples``). A stateful
strategy also sends and expects extra records; for SCAFFOLD (Karimireddy et al., ICML
2020) they are the server control variate c (sent as extra ``c``) and the client's
Δc_i = c_i⁺ − c_i (expected as extra ``dc``), with the client's own c_i kept on the node.
This module fills them, around the user's own training loop::

    from fedsim.flower import scaffold_client

    @app.train()
    def train(msg, context):
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        control = scaffold_client.start(msg, context)   # c and this node's c_i
        for batch in batches:                           # K local SGD steps with step size lr
            loss = loss_fn(model(batch.x), batch.y)
            loss.backward()
            control.correct(model)                      # grad ← grad − c_i + c
            optimizer.step(); optimizer.zero_grad()
        extras = control.finish(model, steps=K, lr=lr)  # Δc_i for the server; c_i⁺ kept pending
        metrics = MetricRecord({"train_loss": ..., "num-examples": len(train_set)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics,
                                   **extras}), reply_to=msg)

The refresh is SCAFFOLD's option II, c_i⁺ = c_i − c + (x − y_K)/(K η), from the model the
node received (x) and the one it ends with (y_K) — correct for plain SGD steps of size η.
As in fedsim, c_i⁺ counts only once the server aggregated the job that produced it: it is
held as pending in ``context.state`` and committed when a later message from the server
names that job as accepted (a straggler's c_i⁺ is dropped). Parameters are matched to the
model in the message by name, so the model's ``named_parameters()`` must carry the names of
the server's model (the ``state_dict`` keys of the ``arrays`` record).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Message

from ..drift import from_displacement
from ..errors import FedsimError
from ..params import ParamLayout
from ..strategy import Tensor
from .client import NodeState
from .records import array_to_tensor, records_to_tensors, tensors_to_records


def sent_by_scaffold(msg: Message) -> bool:
    """Returns True if `msg` carries SCAFFOLD's server control variate (extra ``c``)."""
    return "extras" in msg.content.array_records and "c" in msg.content.array_records["extras"]


def layout_of(record: ArrayRecord) -> ParamLayout:
    """Returns the layout (names, shapes, order) of a model sent as an ``arrays`` record."""
    return ParamLayout(tuple(record.keys()), tuple(tuple(a.shape) for a in record.values()))


@dataclass
class Control:
    """One job's control variates, as name -> tensor shaped like the model's parameters."""

    layout: ParamLayout
    x: Tensor  # the model the node received, flat
    c: Tensor  # the server's control variate, flat
    c_i: Tensor  # this node's control variate, flat
    job: int
    state: NodeState

    def correct(self, model: torch.nn.Module) -> None:
        """Adds c − c_i to the gradient of every parameter of `model` (call after ``backward``)."""
        shift = self.layout.views(self.c - self.c_i)
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(shift[name].to(p.grad.dtype))

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> dict:
        """Returns the records to add to the reply (``extras`` with Δc_i) and keeps c_i⁺ on
        the node as pending; `steps` and `lr` are the K local steps and their step size η."""
        params = dict(model.named_parameters())
        y = self.layout.flatten({n: params[n].detach().to(self.x.dtype) for n in self.layout.names})
        c_new = from_displacement(self.c_i, self.c, self.x - y, steps, lr)
        self.state.hold(self.job, {"c": c_new})
        arrays, numbers = tensors_to_records({"dc": c_new - self.c_i})
        return {"extras": arrays, "extras-numbers": numbers}


def start(msg: Message, context: Context) -> Control:
    """Reads c from the message and this node's c_i from ``context.state`` (zero at first,
    SCAFFOLD's initialisation); commits the previous job's c_i⁺ if the server accepted it.
    Raises FedsimError if the message is not from fedsim's ServerApp running ``scaffold``."""
    content = msg.content
    if not sent_by_scaffold(msg) or "fedsim" not in content.config_records:
        raise FedsimError("this message carries no SCAFFOLD control variate: the server does not run "
                          "fedsim's scaffold strategy")
    record = content.array_records["arrays"]
    layout = layout_of(record)
    x = layout.flatten({n: array_to_tensor(record[n]) for n in layout.names})
    c = records_to_tensors(content.array_records["extras"])["c"].to(x.dtype)
    meta = content.config_records["fedsim"]
    state = NodeState(context.state)
    state.settle(int(meta["accepted-job"]))
    committed = state.committed()
    c_i = committed["c"] if committed else torch.zeros_like(x)
    return Control(layout, x, c, c_i, int(meta["job"]), state)
