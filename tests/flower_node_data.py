"""A node's own data loader for the Flower tests (node config ``load-data``): partition
`partition_id` of the config in `CONFIG` (set by the test), as the simulator partitions it."""
from __future__ import annotations

import functools

import yaml

from fedsim.config import load_config
from fedsim.data import build_federated_data

CONFIG: dict = {}


@functools.lru_cache(maxsize=1)
def _data(text: str):
    cfg = load_config(yaml.safe_load(text))
    return build_federated_data(cfg.data, cfg.partition, cfg.seed)


def load_data(partition_id: int, num_partitions: int):
    """Returns this partition's (x_train, y_train)."""
    data = _data(yaml.safe_dump(CONFIG))
    assert num_partitions == data.num_clients
    rows = data.client_train[partition_id]
    return data.x_train[rows], data.y_train[rows]
