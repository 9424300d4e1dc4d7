"""A fedsim node's own data: Flower's ``load_data(partition_id, num_partitions)`` pattern.

With node config ``load-data="module:function"`` fedsim's ClientApp does not build the
config's data source: it calls ``function(partition_id, num_partitions)`` — code of the
node's own, like its plugins — which returns this node's ``(x_train, y_train)`` or
``(x_train, y_train, x_test, y_test)`` (tensors or arrays; the test pair is the client's
held-out data for evaluate messages). The model is built from the inputs' shape and the
``num-classes`` that a ServerApp without data sends (run config ``evaluation="federated"``).
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from ..data.base import FederatedData, SourceData
from ..errors import FedsimError


def load_function(spec: str):
    """Returns the function named by node config ``load-data`` (``module:function``)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise FedsimError(f"node config load-data must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise FedsimError(f"node config load-data={spec!r}: {exc}") from None


def node_data(spec: str, partition: int, num_clients: int, num_classes: int | None) -> FederatedData:
    """Returns the federated data of a node that serves `partition` of `num_clients`: its own
    samples from ``load-data``, every other client empty."""
    if num_classes is None:
        raise FedsimError("node config load-data needs the number of classes, which the ServerApp sends when it "
                          "runs without data: run config evaluation=\"federated\" with num-classes")
    got = load_function(spec)(partition, num_clients)
    if not isinstance(got, (tuple, list)) or len(got) not in (2, 4):
        raise FedsimError(f"load-data {spec!r} must return (x_train, y_train) or (x_train, y_train, x_test, y_test)")
    x, y, *test = [torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a) for a in got]
    x_test, y_test = test if test else (x[:0], y[:0])
    source = SourceData(x.float(), y.long(), x_test.float(), y_test.long(), num_classes=num_classes)
    empty = np.zeros(0, dtype=np.int64)
    train, held_out = [empty] * num_clients, [empty] * num_clients
    train[partition] = np.arange(len(y), dtype=np.int64)
    held_out[partition] = np.arange(len(y_test), dtype=np.int64)
    return FederatedData(source, train, held_out, client_test_on="test")
