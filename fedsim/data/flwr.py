"""flwr-datasets partitioners on any fedsim source, so a Flower split carries over unchanged.

The partitioner gets a Hugging Face Dataset with one row per training sample of the source,
in the source's order: ``index`` (the sample's position), ``label`` (its class) and, for
sources with users of their own, ``user`` (the user's number in the natural split, −1 for
a sample of none). Partition i, read with ``load_partition(i)``, is client i's training set.
Needs ``pip install 'fedsim[flwr-datasets]'``.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import numpy as np

from ..errors import ConfigError
from ..registry import PARTITIONERS
from .base import PartitionContext


def partitioner_class(name: str) -> type:
    """Returns the flwr_datasets.partitioner class called `name`; raises ConfigError at
    `partitioner` (or naming the extra when flwr-datasets is absent)."""
    try:
        from flwr_datasets import partitioner as module
    except ImportError:
        raise ConfigError("name", "the 'flwr' partitioner needs flwr-datasets: "
                          "pip install 'fedsim[flwr-datasets]'") from None
    base = module.Partitioner
    known = sorted(n for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base) and c is not base)
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base) and cls is not base):
        raise ConfigError("partitioner", f"{name!r} is not a flwr-datasets partitioner (known: {', '.join(known)})")
    return cls


def sample_table(ctx: PartitionContext) -> Any:
    """Returns the datasets.Dataset a partitioner splits: index, label and (with groups) user."""
    from datasets import Dataset

    columns: dict[str, Any] = {"index": np.arange(len(ctx.labels), dtype=np.int64), "label": ctx.labels}
    if ctx.groups is not None:
        user = np.full(len(ctx.labels), -1, dtype=np.int64)
        for u, g in enumerate(ctx.groups):
            user[np.asarray(g, dtype=np.int64)] = u
        columns["user"] = user
    return Dataset.from_dict(columns)


@PARTITIONERS.register("flwr")
def flwr(
    ctx: PartitionContext,
    partitioner: str = "IidPartitioner",
    kwargs: Optional[Dict[str, Any]] = None,
) -> list[np.ndarray]:
    """A flwr-datasets partitioner (DirichletPartitioner, PathologicalPartitioner, ...) by class name.

    Called as flwr-datasets documents it, with `kwargs`; `num_partitions` defaults to
    data.num_clients (and must equal it), `partition_by` to 'label' (the source's classes;
    'user' is the natural user of sources with users), and a `seed` not given is drawn
    from the run's seed, so runs with different seeds get different splits (give the seed
    of a Flower experiment to get its exact split). Needs `pip install 'fedsim[flwr-datasets]'`.

    Args:
        partitioner: The class name in flwr_datasets.partitioner.
        kwargs: Its keyword arguments, as in Flower code (e.g. {alpha: 0.3, min_partition_size: 10}).
    """
    cls = partitioner_class(partitioner)
    params = inspect.signature(cls).parameters
    args = dict(kwargs or {})
    if "num_partitions" in params:
        if args.setdefault("num_partitions", ctx.num_clients) != ctx.num_clients:
            raise ConfigError("kwargs.num_partitions", f"must equal data.num_clients={ctx.num_clients} "
                              f"(got {args['num_partitions']}); leave it out")
    if "partition_by" in params:
        args.setdefault("partition_by", "label")
        if args["partition_by"] not in ("label", "user") or (args["partition_by"] == "user" and ctx.groups is None):
            raise ConfigError("kwargs.partition_by", f"{args['partition_by']!r}: give 'label' (or 'user' for a "
                              "source with users of its own)")
    if "seed" in params:
        args.setdefault("seed", int(ctx.rng.integers(2**31)))
    try:
        split = cls(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError("kwargs", f"{partitioner}: {str(exc).splitlines()[0]}") from None
    split.dataset = sample_table(ctx)
    try:
        if split.num_partitions != ctx.num_clients:
            raise ValueError(f"{partitioner} made {split.num_partitions} partitions for data.num_clients="
                             f"{ctx.num_clients} clients")
        return [np.sort(np.asarray(split.load_partition(i)["index"], dtype=np.int64)) for i in range(ctx.num_clients)]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{partitioner}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


__all__ = ["flwr"]
