"""Data containers shared by sources, partitioners and the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SourceContext:
    """What a data source gets from the engine besides its own knobs.

    `num_clients` is None when `data.num_clients` is 'all': a source with users of its own
    (LEAF, a user column) then makes every user a client; one that generates a population
    of a given size raises ConfigError at `data.num_clients`.
    """

    num_clients: int | None
    seed: int
    test_fraction: float

    def population(self, source: str) -> int:
        """Returns `num_clients` for a source that generates that many users; raises ConfigError
        at `data.num_clients` when it is 'all' (such a source has no users of its own to count)."""
        if self.num_clients is None:
            raise ConfigError("data.num_clients", f"data source {source!r} generates data.num_clients users; "
                              "'all' needs a source with users of its own (leaf, a user column)")
        return self.num_clients


@dataclass
class SourceData:
    """A dataset as a source produces it: train and test tensors, plus a natural split if any.

    `task` is 'classification' (y: int64 class ids) or 'quadratic' (y: float curvature a_i,
    x: sample b_ij; see fedsim.data.sources.quadratic).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    task: str = "classification"
    groups: list[np.ndarray] | None = None  # natural split: per-user indices into x_train
    test_groups: list[np.ndarray] | None = None  # the same users' own test samples: indices into x_test
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class PartitionContext:
    """What a partitioner gets: the labels, the population size, a keyed RNG, natural groups."""

    labels: np.ndarray
    num_clients: int
    rng: np.random.Generator
    num_classes: int | None
    groups: list[np.ndarray] | None = None


@dataclass
class FederatedData:
    """The federated dataset: shared tensors, one index array per client, a global test set."""

    source: SourceData
    client_train: list[np.ndarray]
    client_test: list[np.ndarray]  # per-client test indices (may be empty), into x_train or x_test:
    client_test_on: str = "train"  # 'train' (held out by data.client_test_fraction) or 'test' (the source's per-user test sets)

    @property
    def x_train(self) -> torch.Tensor:
        return self.source.x_train

    @property
    def y_train(self) -> torch.Tensor:
        return self.source.y_train

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def num_samples(self, client: int) -> int:
        """Returns the number of training samples of `client`."""
        return len(self.client_train[client])

    def client_test_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x, y) of `client`'s own test samples (empty tensors when it has none)."""
        idx = torch.as_tensor(self.client_test[client], dtype=torch.int64)
        src = self.source
        x, y = (src.x_train, src.y_train) if self.client_test_on == "train" else (src.x_test, src.y_test)
        return x[idx], y[idx]

    @property
    def has_client_tests(self) -> bool:
        """Whether any client has test samples of its own (per-client evaluation is on)."""
        return any(len(t) for t in self.client_test)

    def samples_per_client(self) -> np.ndarray:
        """Returns n_i for every client."""
        return np.array([len(ix) for ix in self.client_train], dtype=np.int64)
