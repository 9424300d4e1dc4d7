"""Jobs dispatched together, kept as columns.

A synchronous round or a gossip step dispatches a whole cohort at once. `JobBatch` holds
such a dispatch as columns — clients, job ids, versions, sample counts, the [K, B] shapes of
their sample indices — and what the jobs share: one payload object for all (a round's
global model) or one each, and no client state at all for a stateless strategy. The vmap
executor stacks a cohort and the clock times it from these columns, without a `Job` object
per client. A `JobBatch` is a `Sequence[Job]`: indexing builds the job, equal to the one
`RunContext.make_job` builds, so an executor that runs job by job sees the same jobs.
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import TYPE_CHECKING, Any, Iterator, Sequence, overload

import numpy as np
import torch

from ..data.hashed_order import DeferredIndices
from ..strategy import Payload, Tensor
from .base import Job

if TYPE_CHECKING:
    from ..data.hashed_order import DeviceOrders

_NO_STATE: dict[str, Tensor] = {}


class PayloadRows(Sequence[Payload]):
    """One payload per job, held stacked: job i starts from row i of `params` [n, ...] (a
    gossip step's node models). Indexing gives that job's `Payload` (a view of the row);
    the vmap executor takes the stack as it is instead of re-stacking n payloads."""

    __slots__ = ("params",)

    def __init__(self, params: Tensor):
        self.params = params

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def __getitem__(self, i: int) -> Payload:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"payload {i} of {len(self)}")
        return Payload(self.params[i])

    def take(self, rows: np.ndarray) -> "PayloadRows":
        """The payloads at `rows`, in that order."""
        return PayloadRows(self.params[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.params.device)])


class JobBatch(Sequence[Job]):
    """Jobs as columns (treat as read-only). `payloads` is one `Payload` shared by every job,
    or one per job (a list, or `PayloadRows`: stacked); `states` None means every job's
    client state is empty (a stateless strategy); `indices` holds each job's [K, B] sample
    indices, or is None when `orders` computes them for the whole cohort on the executor's
    device (`local.shuffle: hash`)."""

    __slots__ = ("clients", "job_ids", "versions", "num_samples", "shapes", "payloads", "states", "indices", "orders")

    def __init__(self, clients: np.ndarray, job_ids: np.ndarray, versions: np.ndarray, num_samples: np.ndarray,
                 shapes: np.ndarray, payloads: Payload | Sequence[Payload], states: Sequence[dict] | None,
                 indices: Sequence[np.ndarray] | None, orders: "DeviceOrders | Any" = None):
        self.clients = clients  # int64 [n]
        self.job_ids = job_ids  # int64 [n], increasing within a dispatch
        self.versions = versions  # int64 [n]
        self.num_samples = num_samples  # int64 [n]
        self.shapes = shapes  # int64 [n, 2]: each job's (K, B)
        self.payloads = payloads
        self.states = states
        self.indices = indices
        self.orders = orders

    @classmethod
    def of(cls, jobs: Sequence[Job]) -> "JobBatch":
        """Returns `jobs` as a batch (itself when it is one). Jobs whose indices are deferred
        to a device must all come from the same orders (one dispatch)."""
        if isinstance(jobs, JobBatch):
            return jobs
        n = len(jobs)
        ints = np.empty((4, n), dtype=np.int64)
        ints[0] = [j.client for j in jobs]
        ints[1] = [j.job_id for j in jobs]
        ints[2] = [j.version for j in jobs]
        ints[3] = [j.num_samples for j in jobs]
        listed = [tuple(j.indices.shape) for j in jobs]
        if n and listed.count(listed[0]) == n:  # one cohort's shape (C-level count): no array of tuples
            shapes = np.tile(np.asarray(listed[0], dtype=np.int64), (n, 1))
        else:
            shapes = np.array(listed, dtype=np.int64).reshape(n, 2)
        payloads = [j.payload for j in jobs]
        states = [j.state for j in jobs]
        first = jobs[0].indices if n else None
        deferred = isinstance(first, DeferredIndices)
        return cls(ints[0], ints[1], ints[2], ints[3], shapes,
                   payloads[0] if n and all_same(payloads) else payloads,
                   states if any(states) else None,
                   None if deferred else [j.indices for j in jobs], first.orders if deferred else None)

    # ---- what the jobs share -------------------------------------------------------------
    @property
    def shared_payload(self) -> Payload | None:
        """The payload every job starts from, when it is one object; else None."""
        return self.payloads if isinstance(self.payloads, Payload) else None

    def payload_list(self) -> list[Payload]:
        """Each job's payload."""
        p = self.payloads
        return [p] * len(self) if isinstance(p, Payload) else list(p)  # PayloadRows: views of its rows

    def state_list(self) -> list[dict[str, Tensor]]:
        """Each job's client state ({} for a stateless job)."""
        return [_NO_STATE] * len(self) if self.states is None else list(self.states)

    def one_shape(self) -> tuple[int, int] | None:
        """The [K, B] shape every job shares, or None when they differ (or there are none)."""
        if not len(self):
            return None
        k, b = int(self.shapes[0, 0]), int(self.shapes[0, 1])
        return (k, b) if bool((self.shapes == self.shapes[0]).all()) else None

    @property
    def num_steps(self) -> np.ndarray:
        """Each job's number of local steps K (int64 [n])."""
        return self.shapes[:, 0]

    # ---- rows ----------------------------------------------------------------------------
    def take(self, rows: Sequence[int] | np.ndarray) -> "JobBatch":
        """The batch of the jobs at `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        at = rows.tolist()

        def pick(values: Any) -> Any:
            if values is None or isinstance(values, Payload):
                return values
            return values.take(rows) if isinstance(values, PayloadRows) else [values[i] for i in at]

        return JobBatch(self.clients[rows], self.job_ids[rows], self.versions[rows], self.num_samples[rows],
                        self.shapes[rows], pick(self.payloads), pick(self.states), pick(self.indices), self.orders)

    def __len__(self) -> int:
        return len(self.clients)

    @overload
    def __getitem__(self, i: int) -> Job: ...
    @overload
    def __getitem__(self, i: slice) -> "JobBatch": ...

    def __getitem__(self, i: int | slice) -> Job | "JobBatch":
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"job {i} of a batch of {n}")
        i %= n
        client, job_id = int(self.clients[i]), int(self.job_ids[i])
        shape = (int(self.shapes[i, 0]), int(self.shapes[i, 1]))
        p = self.payloads
        indices = (self.indices[i] if self.indices is not None
                   else DeferredIndices(self.orders, client, job_id, shape))
        return Job(job_id, client, int(self.versions[i]), p if isinstance(p, Payload) else p[i],
                   {} if self.states is None else self.states[i], indices, int(self.num_samples[i]))

    def __iter__(self) -> Iterator[Job]:
        return (self[i] for i in range(len(self)))

    def __reduce__(self):  # travels (to Ray actors, in pickles) as the list of its jobs
        return (list, (list(self),))

    def __repr__(self) -> str:
        return f"JobBatch({len(self)} jobs, clients {self.clients[:8].tolist()}{'...' if len(self) > 8 else ''})"


def all_same(values: Sequence[Any]) -> bool:
    """True when every value is the same object as the first (identity, not equality)."""
    return all(map(operator.is_, values, repeat(values[0]))) if values else True
