"""Clients' contributions, one row per client: what every executor returns and every combine reads.

A `Contributions` value is columnar: row i is one client's answer to one job. The executor
fills what the client computed (``updates`` ``[m, ...]``, ``extras``, ``state``, ``metrics``)
and what the job was (``senders``, ``jobs``, ``versions``, ``num_samples``, ``num_steps``);
the protocol selects the rows it aggregates (`take`, `concat`) and sets what only it knows
(``weights``, ``staleness``, ``bases``) before handing them to the strategy's ``combine``.
It is a value: nobody assigns its fields or writes its tensors in place; every change is a
new value (`replace`). (The dataclass is not `frozen`: a frozen one costs ~2 µs more to build,
and the asynchronous protocols build one per arriving client.)

Most reducers read the columns (``vec.weighted_sum(c.updates, c.weights)``). A strategy that
reads contributions one by one iterates `rows()`, which yields one `Contribution` per row.

Updates are usually one tensor. A compressed uplink sends encoded messages
(`fedsim.compressors`), which do not stack: ``updates`` is then a tuple of them, and the
strategy's ``receive`` step turns them into a tensor before ``combine`` (see
`fedsim.strategy.ServerStrategy`).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from .errors import DivergenceError
from .state_types import checkpointable

Tensor = torch.Tensor


class Contribution(NamedTuple):
    """One row of `Contributions`, for strategies that read contributions one by one."""

    sender: int
    update: Any  # a tensor, or an encoded message before `receive`
    weight: float
    staleness: int
    base: Tensor | None  # the model the sender started from
    num_samples: int
    num_steps: int
    extras: Mapping[str, Tensor]


@checkpointable
@dataclass(slots=True, eq=False)
class Contributions:
    """See the module docstring. Every column has one entry per row (``len`` = m)."""

    senders: np.ndarray  # int64 [m]: client (or node) ids
    updates: Any  # Tensor [m, ...], or a tuple of m encoded messages
    num_samples: np.ndarray  # int64 [m]: the senders' training-set sizes
    num_steps: np.ndarray  # int64 [m]: local steps each job ran
    jobs: np.ndarray  # int64 [m]: the jobs' ids
    versions: np.ndarray  # int64 [m]: the model version (or round) each job started from
    extras: Mapping[str, Tensor] = field(default_factory=dict)  # further uplink vectors, each [m, ...] (e.g. SCAFFOLD's Δc_i)
    state: Mapping[str, Tensor] = field(default_factory=dict)  # the senders' new persistent state, each [m, ...] (stays with the protocol)
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)  # float64 [m] per name; NaN where a sender did not report it
    weights: np.ndarray | None = None  # float64 [m]: aggregation weights, set by the protocol
    staleness: np.ndarray | None = None  # int64 [m]: server versions since each sender's model was published
    bases: Tensor | tuple[Tensor, ...] | None = None  # the model every sender started from ([d]), or one per row

    # ---- building ---------------------------------------------------------------------------
    @staticmethod
    def empty() -> "Contributions":
        """Returns zero contributions (an aggregation that received nothing)."""
        none = np.zeros(0, dtype=np.int64)
        return Contributions(none, (), none, none, none, none, weights=np.zeros(0), staleness=none)

    def replace(self, **changes: Any) -> "Contributions":
        """Returns a copy with the given fields changed (weights, staleness, bases, updates…)."""
        return dataclasses.replace(self, **changes)

    def __len__(self) -> int:
        return len(self.senders)

    @property
    def stacked(self) -> bool:
        """True when the updates are one tensor (False: encoded messages, before `receive`)."""
        return isinstance(self.updates, torch.Tensor)

    def take(self, rows: Sequence[int] | np.ndarray) -> "Contributions":
        """Returns the contributions of `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self) and bool((rows == np.arange(len(self))).all()):
            return self
        return Contributions(
            self.senders[rows], _take(self.updates, rows), self.num_samples[rows], self.num_steps[rows],
            self.jobs[rows], self.versions[rows], _take_all(self.extras, rows), _take_all(self.state, rows),
            {k: v[rows] for k, v in self.metrics.items()},
            None if self.weights is None else self.weights[rows],
            None if self.staleness is None else self.staleness[rows],
            self.bases if not isinstance(self.bases, tuple) else tuple(self.bases[i] for i in rows.tolist()),
        )

    def row(self, i: int) -> "Contributions":
        """Returns row i alone (views of this value's columns: cheaper than `take` for one row)."""
        s = slice(i, i + 1)
        return Contributions(
            self.senders[s], self.updates[s], self.num_samples[s], self.num_steps[s], self.jobs[s], self.versions[s],
            {k: v[s] for k, v in self.extras.items()} if self.extras else {},
            {k: v[s] for k, v in self.state.items()} if self.state else {},
            {k: v[s] for k, v in self.metrics.items()} if self.metrics else {},
            None if self.weights is None else self.weights[s], None if self.staleness is None else self.staleness[s],
            self.bases if not isinstance(self.bases, tuple) else self.bases[s],
        )

    def split(self) -> list["Contributions"]:
        """Returns every row alone, in order: ``[self.row(i) for i in range(len(self))]``, built
        column by column (a few times cheaper per row: an executor that answers job by job
        splits each cohort once)."""
        m = len(self)
        if not m:
            return []

        def each(col: Any) -> Iterator[Any]:
            if col is None:
                return itertools.repeat(None, m)
            if isinstance(col, torch.Tensor):
                return iter(col.unsqueeze(1).unbind(0))
            if isinstance(col, np.ndarray):
                return iter(col[:, None])
            return (col[i:i + 1] for i in range(m))  # a tuple of encoded messages or bases

        def mappings(named: Mapping[str, Any]) -> Iterator[dict]:
            if not named:
                return (dict() for _ in range(m))
            if len(named) == 1:
                (name, col), = named.items()
                return ({name: v} for v in each(col))
            names = list(named)
            return (dict(zip(names, vs)) for vs in zip(*(each(named[k]) for k in names)))

        bases = each(self.bases) if isinstance(self.bases, tuple) else itertools.repeat(self.bases, m)
        return list(map(Contributions, each(self.senders), each(self.updates), each(self.num_samples),
                        each(self.num_steps), each(self.jobs), each(self.versions), mappings(self.extras),
                        mappings(self.state), mappings(self.metrics), each(self.weights), each(self.staleness), bases))

    @staticmethod
    def concat(parts: Sequence["Contributions"]) -> "Contributions":
        """Returns the rows of `parts`, one after the other; raises ValueError when their extras
        or state differ in names (parts without rows are skipped)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Contributions.empty()
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        for p in parts[1:]:
            if p.extras.keys() != first.extras.keys() or p.state.keys() != first.state.keys():
                raise ValueError(f"cannot concatenate contributions with extras {sorted(first.extras)} and state "
                                 f"{sorted(first.state)} to ones with {sorted(p.extras)} and {sorted(p.state)}")
        cat = np.concatenate
        names = sorted({k for p in parts for k in p.metrics})
        metrics = {k: cat([p.metrics[k] if k in p.metrics else np.full(len(p), np.nan) for p in parts]) for k in names}
        return Contributions(
            cat([p.senders for p in parts]), _cat([p.updates for p in parts]), cat([p.num_samples for p in parts]),
            cat([p.num_steps for p in parts]), cat([p.jobs for p in parts]), cat([p.versions for p in parts]),
            {k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
            {k: torch.cat([p.state[k] for p in parts]) for k in first.state},
            metrics,
            None if any(p.weights is None for p in parts) else cat([p.weights for p in parts]),
            None if any(p.staleness is None for p in parts) else cat([p.staleness for p in parts]),
            _cat_bases(parts),
        )

    # ---- reading ----------------------------------------------------------------------------
    def base(self, i: int) -> Tensor | None:
        """Returns the model row i's sender started from."""
        return self.bases[i] if isinstance(self.bases, tuple) else self.bases

    def rows(self) -> Iterator[Contribution]:
        """Yields one `Contribution` per row (for strategies that read them one by one)."""
        ups = self.updates.unbind(0) if self.stacked else self.updates
        extras = {k: v.unbind(0) for k, v in self.extras.items()}
        weights = self.weights.tolist() if self.weights is not None else [1.0] * len(self)
        staleness = self.staleness.tolist() if self.staleness is not None else [0] * len(self)
        for i, (s, n, k) in enumerate(zip(self.senders.tolist(), self.num_samples.tolist(), self.num_steps.tolist())):
            yield Contribution(s, ups[i], weights[i], staleness[i], self.base(i), n, k,
                               {name: col[i] for name, col in extras.items()})

    def scaled_weights(self, staleness_fn: Any = None) -> np.ndarray:
        """Returns ``w_i · s(τ_i)`` (s called once per distinct staleness; w_i alone without it)."""
        if self.weights is None:
            raise ValueError("these contributions have no aggregation weights yet (the protocol sets them)")
        if staleness_fn is None or self.staleness is None or not len(self):
            return self.weights
        distinct, which = np.unique(self.staleness, return_inverse=True)
        scale = np.array([float(staleness_fn(int(t))) for t in distinct], dtype=np.float64)
        return self.weights * scale[which]

    def metric_means(self) -> dict[str, float]:
        """Returns each metric's mean over the rows that reported it (names nobody reported are left out)."""
        out = {}
        for name, col in self.metrics.items():
            col = np.asarray(col, dtype=np.float64)
            seen = col[~np.isnan(col)]
            if len(seen):
                out[name] = float(seen.mean())
        return out

    def uplink_bytes(self) -> np.ndarray:
        """Returns the bytes each row's sender sent (its update and one row of each extra), int64 [m]."""
        from .comm import nbytes

        m = len(self)
        if not m:
            return np.zeros(0, dtype=np.int64)
        extra = sum(_row_bytes(v) for v in self.extras.values())
        if self.stacked:
            return np.full(m, _row_bytes(self.updates) + extra, dtype=np.int64)
        return np.array([nbytes(u) + extra for u in self.updates], dtype=np.int64)

    def row_uplink_bytes(self, i: int) -> int:
        """Returns the bytes row i's sender sent: ``uplink_bytes()[i]`` without the array."""
        from .comm import nbytes

        extra = sum(_row_bytes(v) for v in self.extras.values()) if self.extras else 0
        return (_row_bytes(self.updates) if self.stacked else nbytes(self.updates[i])) + extra

    def check_finite(self, round_: int, seconds: float) -> None:
        """Raises DivergenceError naming the first sender whose update has NaN or inf entries.

        One reduction per row and one device synchronisation: each row is reduced to one
        number in which a NaN or inf survives (its sum on the CPU, its L1 norm elsewhere); the
        rows so flagged (an overflowing sum too) are then checked entry by entry."""
        if not len(self):
            return
        if not self.stacked:  # encoded messages: their decoded vectors are checked after `receive`
            return
        flat = self.updates.reshape(len(self), -1)
        totals = flat.sum(1) if flat.device.type == "cpu" else torch.linalg.vector_norm(flat, 1, dim=1)
        for i in torch.nonzero(~torch.isfinite(totals)).flatten().tolist():
            if not bool(torch.isfinite(flat[i]).all()):
                raise DivergenceError(f"client {int(self.senders[i])}'s update has NaN/inf in round {round_} "
                                      f"(virtual time {seconds:.6g} s); lower local.lr or the server learning rate")


def _row_bytes(column: Any) -> int:
    """Returns the wire size of one row of a column (rows [m, ...]); for a tensor without
    making the row (a view costs microseconds, and the asynchronous protocols ask job by job)."""
    if isinstance(column, torch.Tensor):
        return (column.numel() // column.shape[0]) * column.element_size()
    from .comm import nbytes

    return nbytes(column[0])


def _take(updates: Any, rows: np.ndarray) -> Any:
    if isinstance(updates, torch.Tensor):
        return updates.index_select(0, torch.as_tensor(rows, device=updates.device))
    return tuple(updates[i] for i in rows.tolist())


def _take_all(columns: Mapping[str, Tensor], rows: np.ndarray) -> Mapping[str, Tensor]:
    if not columns:
        return {}
    return {k: _take(v, rows) for k, v in columns.items()}


def _cat(updates: list[Any]) -> Any:
    if all(isinstance(u, torch.Tensor) for u in updates):
        return torch.cat(updates)
    return tuple(row for u in updates for row in (u.unbind(0) if isinstance(u, torch.Tensor) else u))


def _cat_bases(parts: list[Contributions]) -> Tensor | tuple[Tensor, ...] | None:
    first = parts[0].bases
    if all(p.bases is first for p in parts) and not isinstance(first, tuple):
        return first
    if any(p.bases is None for p in parts):
        return None
    return tuple(p.base(i) for p in parts for i in range(len(p)))


def from_outputs(jobs: Sequence[Any], outputs: Sequence[Any]) -> Contributions:
    """Returns the contributions of `jobs` (`fedsim.executors.base.Job`) from their clients'
    `ClientOutput`s (one each, in the same order): updates, extras and state rows are stacked."""
    m = len(jobs)
    if not m:
        return Contributions.empty()
    first = outputs[0]
    tensor = isinstance(first.update, torch.Tensor)
    updates = torch.stack([o.update for o in outputs]) if tensor else tuple(o.update for o in outputs)
    names = sorted({k for o in outputs for k in o.metrics})
    metrics = {k: np.array([float(o.metrics[k]) if k in o.metrics else np.nan for o in outputs]) for k in names}
    return Contributions(
        np.fromiter((j.client for j in jobs), np.int64, m), updates,
        np.fromiter((j.num_samples for j in jobs), np.int64, m), np.fromiter((j.num_steps for j in jobs), np.int64, m),
        np.fromiter((j.job_id for j in jobs), np.int64, m), np.fromiter((j.version for j in jobs), np.int64, m),
        _stack_named([o.extras for o in outputs]), _stack_named([o.state for o in outputs]), metrics,
    )


def contributions(updates: Tensor | Sequence[Any], weights: Sequence[float] | None = None, *,
                  senders: Sequence[int] | None = None, staleness: Sequence[int] | None = None,
                  num_samples: Sequence[int] | None = None, num_steps: Sequence[int] | None = None,
                  extras: Mapping[str, Any] | None = None, bases: Any = None) -> Contributions:
    """Returns contributions made by hand (tests, notebooks): `updates` ``[m, ...]`` (or m
    tensors); defaults: equal weights 1/m, senders 0..m−1, staleness 0, one sample and one
    step each, no extras. `extras` maps names to ``[m, ...]`` tensors or lists of m tensors."""
    if not isinstance(updates, torch.Tensor):
        updates = torch.stack(list(updates)) if all(isinstance(u, torch.Tensor) for u in updates) else tuple(updates)
    m = len(updates)

    def ints(values: Sequence[int] | None, default: np.ndarray) -> np.ndarray:
        return default if values is None else np.asarray(values, dtype=np.int64)

    ones = np.ones(m, dtype=np.int64)
    return Contributions(
        ints(senders, np.arange(m, dtype=np.int64)), updates, ints(num_samples, ones), ints(num_steps, ones),
        np.arange(m, dtype=np.int64), np.zeros(m, dtype=np.int64),
        {k: v if isinstance(v, torch.Tensor) else torch.stack([torch.as_tensor(x) for x in v])
         for k, v in (extras or {}).items()},
        weights=np.full(m, 1.0 / max(m, 1)) if weights is None else np.asarray(weights, dtype=np.float64),
        staleness=ints(staleness, np.zeros(m, dtype=np.int64)), bases=bases,
    )


def _stack_named(rows: list[Mapping[str, Any]]) -> Mapping[str, Tensor]:
    if not rows[0]:
        return {}
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


__all__ = ["Contribution", "Contributions", "contributions", "from_outputs"]
