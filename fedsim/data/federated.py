"""Builds the federated dataset from the config: source → partition → per-client test split."""
from __future__ import annotations

import numpy as np

from ..config.components import Component
from ..errors import ConfigError, DataError
from ..rng import numpy_rng
from .base import FederatedData, PartitionContext, SourceContext, SourceData


def check_not_empty(source: SourceData, name: str, test_fraction: float) -> None:
    """Raises DataError (ConfigError when `data.test_fraction` is 0) if the source has no
    training or no test samples: nothing could be trained or evaluated."""
    if len(source.y_train) == 0:
        raise DataError(f"data source {name!r} has 0 training samples")
    if len(source.y_test) == 0:
        if test_fraction == 0:
            raise ConfigError("data.test_fraction", f"0 leaves data source {name!r} with no test samples")
        raise DataError(f"data source {name!r} has 0 test samples")


def build_federated_data(data: Component, partition: Component, seed: int) -> FederatedData:
    """Returns the FederatedData described by the `data` section (source, partition, splits)."""
    common = data.common
    every_user = common["num_clients"] == "all"
    source = data.build(SourceContext(None if every_user else common["num_clients"], seed, common["test_fraction"]))
    check_not_empty(source, data.name, common["test_fraction"])
    if every_user and source.groups is None:
        raise ConfigError("data.num_clients", f"'all' needs a source with users of its own (leaf, a user column); "
                          f"data source {data.name!r} has none, give a number")
    num_clients = len(source.groups) if every_user else common["num_clients"]
    labels = source.y_train.numpy() if source.task == "classification" else np.zeros(len(source.y_train), dtype=np.int64)
    ctx = PartitionContext(
        labels=labels,
        num_clients=num_clients,
        rng=numpy_rng(seed, "partition"),
        num_classes=source.num_classes,
        groups=source.groups,
    )
    parts = partition.build(ctx)
    frac = common["client_test_fraction"]
    if source.test_groups is not None and source.groups is not None and partition.name in ("natural", "auto"):
        if frac > 0:
            raise ConfigError("data.client_test_fraction", f"data source {data.name!r} has its own per-user test "
                              "sets (used as each client's test data); set 0")
        own = [np.asarray(g, dtype=np.int64) for g in source.test_groups[: len(parts)]]
        return FederatedData(source, [np.asarray(p, dtype=np.int64) for p in parts], own, client_test_on="test")
    train, test = [], []
    for i, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        if frac > 0 and len(idx) > 1:
            perm = numpy_rng(seed, "client_test_split", i).permutation(idx)
            k = min(max(1, int(round(len(idx) * frac))), len(idx) - 1)
            test.append(np.sort(perm[:k]))
            train.append(np.sort(perm[k:]))
        else:
            train.append(idx)
            test.append(np.zeros(0, dtype=np.int64))
    return FederatedData(source, train, test)
