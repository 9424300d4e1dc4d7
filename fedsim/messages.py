"""The messages of one aggregation kept as rows of the executor's results (`MsgBatch`).

A strategy's ``combine(state, msgs, ctx)`` takes a ``Sequence[Msg]``. A protocol that
aggregates many results at once passes a `MsgBatch`: it *is* that sequence (each `Msg`
built on first access, all at once), and it also gives the weights, staleness values and
senders as arrays and — when the executor returned its results stacked (`ResultBatch`) —
the updates as one ``[m, ...]`` tensor. Reducers that only need a weighted sum of the
updates (`fedsim.blocks.weighted_sum`, used by FedAvg, FedProx, FedAvgM, FedOpt…) then
reduce the stack directly, and no per-client object is built for the round. Strategies that
read messages one by one are unaffected.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .executors.base import JobResult
from .executors.results import ResultBatch, stacked_update_rows
from .lazy_seq import BuiltOnce
from .strategy import Msg, Tensor


class MsgBatch(BuiltOnce[Msg]):
    """Message i is the result ``results[rows[i]]`` with weight ``weights[i]`` and staleness
    ``staleness[i]``, sent from the model `base` (shared by all; None when they differ)."""

    __slots__ = ("results", "rows", "weights", "staleness", "base", "_updates")

    def __init__(self, results: Sequence[JobResult], rows: np.ndarray, weights: np.ndarray,
                 staleness: np.ndarray | None = None, base: Tensor | None = None):
        super().__init__()
        self.results = results
        self.rows = np.asarray(rows, dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.staleness = np.zeros(len(self.rows), dtype=np.int64) if staleness is None else np.asarray(staleness)
        if not len(self.rows) == len(self.weights) == len(self.staleness):
            raise ValueError("rows, weights and staleness must have one entry per message")
        self.base = base
        self._updates: Tensor | None = None

    @property
    def stacked(self) -> bool:
        """True when the updates are already one tensor (reading `updates` copies rows, not clients)."""
        return isinstance(self.results, ResultBatch)

    @property
    def updates(self) -> Tensor:
        """The messages' updates as one ``[m, ...]`` tensor, row i = message i (made on first use)."""
        if self._updates is None:
            self._updates = stacked_update_rows(self.results, self.rows)
        return self._updates

    def staleness_weights(self, fn: Any) -> np.ndarray:
        """Returns ``[w_i · fn(τ_i)]`` (fn is called once per distinct τ)."""
        distinct, which = np.unique(self.staleness, return_inverse=True)
        scale = np.array([float(fn(int(t))) for t in distinct], dtype=np.float64)
        return self.weights * scale[which]

    def __len__(self) -> int:
        return len(self.rows)

    def msgs(self) -> list[Msg]:
        """Returns the per-message `Msg`s (built on the first call, then kept)."""
        return self.built()

    def _build(self) -> list[Msg]:
        results, base = self.results, self.base
        return [
            Msg(r.client, r.output.update, w, s, r.num_samples, r.num_steps, base, r.output.extras)
            for r, w, s in zip((results[i] for i in self.rows.tolist()), self.weights.tolist(), self.staleness.tolist())
        ]


__all__ = ["MsgBatch"]
