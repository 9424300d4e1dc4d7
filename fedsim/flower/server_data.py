"""What a ServerApp without data knows of the clients' data: how many clients, and the shape
of one model input (run config ``evaluation = "federated"``).

The clients' data then exists only on the nodes (an ordinary ClientApp's own ``load_data``,
or the config's data source built by each fedsim node, never by the server). The server
builds its model from the run config's ``input-shape`` and ``num-classes``, takes every
aggregation weight from the replies' ``num-examples``, and evaluates by asking the nodes
(`fedsim.flower.link.NodeLink.evaluate`). What cannot work without knowing the data in
advance is refused with the config key that asks for it (`check_dataless`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config.load import Config
from ..data.base import FederatedData, SourceData
from ..errors import ConfigError
from .settings import FlowerSettings


def check_dataless(config: Config, settings: FlowerSettings) -> int:
    """Returns the number of clients of a data-free ServerApp; raises ConfigError naming the
    key of what needs the data on the server."""
    shape = settings.input_shape.split()
    if not shape or not all(s.isdigit() and int(s) > 0 for s in shape):
        raise ConfigError("run-config.input-shape", "evaluation='federated' builds the model without data: give the "
                          f"shape of one input as positive integers, e.g. '20' or '1 28 28' (got {settings.input_shape!r})")
    if settings.num_classes < 2:
        raise ConfigError("run-config.num-classes", "evaluation='federated' builds the model without data: give "
                          f"the number of classes, at least 2 (got {settings.num_classes})")
    num_clients = config.data.common["num_clients"]
    if num_clients == "all":
        raise ConfigError("data.num_clients", "a ServerApp without data cannot count the users of a data source: "
                          "give the number of clients (one SuperNode each)")
    proto = config.protocol.kwargs
    if proto.get("weighting") in ("unbiased", "unbiased_online") and proto.get("client_weights") == "samples":
        raise ConfigError("protocol.client_weights", "'samples' needs every client's sample count in advance, which "
                          "a ServerApp without data does not have; use 'uniform' (or evaluation='server')")
    return int(num_clients)


def dataless_data(num_clients: int, settings: FlowerSettings) -> FederatedData:
    """Returns the server's stand-in for data it does not have: `num_clients` clients without
    samples, no test set, and two zero inputs of the given shape (to check the model's outputs)."""
    shape = tuple(int(s) for s in settings.input_shape.split())
    none = torch.zeros((0, *shape))
    source = SourceData(torch.zeros((2, *shape)), torch.zeros(2, dtype=torch.int64), none,
                        torch.zeros(0, dtype=torch.int64), num_classes=settings.num_classes)
    empty = np.zeros(0, dtype=np.int64)
    return FederatedData(source, [empty] * num_clients, [empty] * num_clients)
