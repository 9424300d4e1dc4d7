"""The 'flwr' partition kind: a flwr-datasets partitioner on a fedsim source gives exactly the
split flwr-datasets gives on the same labels and seed; bad names and arguments are one line."""
from __future__ import annotations

import numpy as np
import pytest

from fedsim.config.load import load_config
from fedsim.data import build_federated_data
from fedsim.data.base import PartitionContext
from fedsim.data.flwr import flwr
from fedsim.errors import ConfigError

from .conftest import digits_config

fd = pytest.importorskip("flwr_datasets.partitioner")
datasets = pytest.importorskip("datasets")


def config(partition):
    return load_config({**digits_config(), "data": {"name": "digits", "num_clients": 6, "partition": partition}})


def flower_split(cls, labels, **kwargs):
    """The partitions flwr-datasets itself gives on a dataset of these labels (sorted row ids)."""
    part = cls(**kwargs)
    part.dataset = datasets.Dataset.from_dict({"row": np.arange(len(labels)), "label": labels})
    return [np.sort(np.asarray(part.load_partition(i)["row"])) for i in range(part.num_partitions)]


@pytest.mark.parametrize("partitioner, kwargs", [
    ("DirichletPartitioner", {"alpha": 0.3, "min_partition_size": 5, "seed": 7}),
    ("PathologicalPartitioner", {"num_classes_per_partition": 2, "seed": 3}),
])
def test_the_config_gives_flower_s_own_split_of_the_source(partitioner, kwargs):
    cfg = config({"name": "flwr", "partitioner": partitioner, "kwargs": kwargs})
    fed = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    want = flower_split(getattr(fd, partitioner), fed.y_train.numpy(), num_partitions=6, partition_by="label", **kwargs)
    assert len(fed.client_train) == 6
    assert all(np.array_equal(a, b) for a, b in zip(fed.client_train, want))


def test_without_a_seed_the_split_follows_the_run_seed():
    labels = np.repeat(np.arange(4), 25)
    split = lambda seed: flwr(PartitionContext(labels, 5, np.random.default_rng(seed), 4),  # noqa: E731
                              partitioner="DirichletPartitioner", kwargs={"alpha": 0.5, "min_partition_size": 2})
    assert all(np.array_equal(a, b) for a, b in zip(split(1), split(1)))
    assert not all(np.array_equal(a, b) for a, b in zip(split(1), split(2)))


def test_natural_users_can_be_partitioned_by_the_user_column():
    labels = np.zeros(6, dtype=np.int64)
    groups = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    parts = flwr(PartitionContext(labels, 3, np.random.default_rng(0), 2, groups=groups),
                 partitioner="NaturalIdPartitioner", kwargs={"partition_by": "user"})
    assert sorted(map(tuple, parts)) == sorted(tuple(g) for g in groups)


@pytest.mark.parametrize("partition, match", [
    ({"partitioner": "NoSuchPartitioner"}, "data.partition.partitioner: 'NoSuchPartitioner' is not a flwr-datasets "
                                           "partitioner \\(known: .*DirichletPartitioner"),
    ({"partitioner": "IidPartitioner", "kwargs": {"num_partitions": 3}},
     "data.partition.kwargs.num_partitions: must equal data.num_clients=6"),
    ({"partitioner": "DirichletPartitioner", "kwargs": {"alpha": 0.3, "bogus": 1}},
     "data.partition.kwargs: DirichletPartitioner: .*bogus"),
    ({"partitioner": "DirichletPartitioner", "kwargs": {"alpha": 0.3, "partition_by": "fine_label"}},
     "data.partition.kwargs.partition_by: 'fine_label'"),
])
def test_bad_partitioners_are_one_line_config_errors(partition, match):
    cfg = config({"name": "flwr", **partition})
    with pytest.raises(ConfigError, match=match) as info:
        build_federated_data(cfg.data, cfg.partition, cfg.seed)
    assert len(str(info.value).splitlines()) == 1


def test_without_flwr_datasets_the_error_names_the_extra(monkeypatch):
    import sys

    cfg = config({"name": "flwr", "partitioner": "IidPartitioner"})
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # import flwr_datasets -> ImportError
    with pytest.raises(ConfigError, match=r"^data.partition.name: .*pip install 'fedsim\[flwr-datasets\]'$"):
        build_federated_data(cfg.data, cfg.partition, cfg.seed)
