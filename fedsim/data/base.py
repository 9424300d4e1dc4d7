"""Data containers shared by sources, partitioners and the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SourceContext:
    """What a data source gets from the engine besides its own knobs."""

    num_clients: int
    seed: int
    test_fraction: float


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
    client_test: list[np.ndarray]  # per-client held-out indices into x_train (may be empty)

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

    def samples_per_client(self) -> np.ndarray:
        """Returns n_i for every client."""
        return np.array([len(ix) for ix in self.client_train], dtype=np.int64)
