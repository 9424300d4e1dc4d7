"""A cohort's results kept stacked: one tensor per output, per-client `JobResult`s on demand.

The vectorised executor computes a whole cohort's updates as one ``[n, d]`` tensor. Splitting
it into n `JobResult`s costs ~2 µs of host time per client (a view, a `ClientOutput`, a
`JobResult`, a metrics dict) — more than the GPU step itself for small models. A
`ResultBatch` is the list of those results without building them: it behaves as a
``Sequence[JobResult]`` (each built on first access, all at once), and it also exposes the
stacked tensors, the per-row facts as arrays and the metrics as columns, so a consumer that
works on arrays (the synchronous and decentralized protocols) never builds per-client objects.

Every result in a batch succeeded (a failed job is never part of one).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..comm import nbytes
from ..lazy_seq import BuiltOnce
from ..strategy import ClientOutput, Tensor
from .base import Job, JobResult


class ResultBatch(BuiltOnce[JobResult]):
    """The results of `jobs`, row i belonging to ``jobs[i]``; see the module docstring.

    `updates` is ``[n, ...]``; `state` and `extras` map names to ``[n, ...]`` tensors;
    metric columns arrive with `set_metrics` (the executor copies them to the host last).
    """

    __slots__ = ("jobs", "updates", "state", "extras", "steps", "_metrics", "_rows")

    def __init__(self, jobs: Sequence[Job], updates: Tensor, state: Mapping[str, Tensor],
                 extras: Mapping[str, Tensor], steps: int | Sequence[int]):
        if updates.shape[0] != len(jobs):
            raise ValueError(f"{updates.shape[0]} update rows for {len(jobs)} jobs")
        super().__init__()
        self.jobs = jobs
        self.updates = updates
        self.state = dict(state)
        self.extras = dict(extras)
        self.steps = steps  # local steps: one count for all rows (a cohort's), or one per row
        self._metrics: dict[str, list[float]] | None = None
        self._rows: list[dict[str, Any]] | None = None  # the built results' metric dicts, until metrics arrive

    # ---- the facts, as arrays --------------------------------------------------------------
    def set_metrics(self, columns: dict[str, list[float]]) -> None:
        """Stores the per-client scalar metrics, one list of n floats per name (and writes
        them into the per-client results if those were built before they arrived)."""
        self._metrics = columns
        if self._rows is not None:
            _fill_rows(self._rows, columns)
            self._rows = None

    @property
    def metrics(self) -> dict[str, list[float]]:
        """Per-client scalar metrics as columns ({name: n floats})."""
        if self._metrics is None:
            raise RuntimeError("the batch's metrics have not reached the host yet")
        return self._metrics

    @property
    def clients(self) -> np.ndarray:
        """The rows' client ids."""
        return np.fromiter((j.client for j in self.jobs), dtype=np.int64, count=len(self.jobs))

    def uplink_bytes(self) -> int:
        """Bytes one client sends (the same for every row: one update and one row of each extra)."""
        return nbytes(self.updates[0]) + sum(nbytes(v[0]) for v in self.extras.values())

    # ---- the Sequence[JobResult] view --------------------------------------------------------
    def __len__(self) -> int:
        return len(self.jobs)

    def results(self) -> list[JobResult]:
        """Returns the per-client JobResults (built on the first call, then kept).

        Updates and extras are views of the stacked tensors (short-lived uplinks); each
        client state is cloned, because the runtime may keep it for the rest of the run
        and a view would pin the whole stack in memory. Called before the metrics arrive
        (the executor does, to build them while the device computes), the results' metric
        dicts are filled when they do."""
        return self.built()

    def _build(self) -> list[JobResult]:
        rows: list[dict[str, Any]] = [{} for _ in range(len(self))]
        if self._metrics is not None:
            _fill_rows(rows, self._metrics)
        else:
            self._rows = rows
        return job_results(self.jobs, _outputs(self, rows), self.steps)


def _fill_rows(rows: list[dict[str, Any]], columns: dict[str, list[float]]) -> None:
    for name, column in columns.items():
        for row, value in zip(rows, column):
            row[name] = value


def _outputs(batch: ResultBatch, rows: list[dict[str, Any]]) -> list[ClientOutput]:
    n = len(batch)
    updates = batch.updates.unbind(0)
    if not batch.state and not batch.extras:  # the common case, kept lean: this runs once per client
        new = tuple.__new__  # ClientOutput(...) without the NamedTuple's Python-level __new__
        return [new(ClientOutput, (u, {}, {}, r)) for u, r in zip(updates, rows)]
    extras = {k: v.unbind(0) for k, v in batch.extras.items()}
    return [
        ClientOutput(updates[i], {k: v[i].clone() for k, v in batch.state.items()},
                     {k: v[i] for k, v in extras.items()}, rows[i])
        for i in range(n)
    ]


def job_results(jobs: Sequence[Job], outputs: Sequence[ClientOutput | None], steps: int | Sequence[int]) -> list[JobResult]:
    """Returns the JobResults of `jobs` from their outputs; `steps`: one local-step count for all, or one each."""
    result = JobResult
    if isinstance(steps, int):
        return [result(j.job_id, j.client, j.version, out, j.num_samples, steps) for j, out in zip(jobs, outputs)]
    return [result(j.job_id, j.client, j.version, out, j.num_samples, k) for j, out, k in zip(jobs, outputs, steps)]


def merge_batches(batches: Sequence[ResultBatch], jobs: Sequence[Job]) -> ResultBatch | None:
    """Returns one batch holding the rows of `batches` (cohorts of one run, metrics arrived) in
    the order of `jobs` — their jobs, reordered — or None when they cannot share a stack
    (different update shapes, devices or dtypes, state, extras or metric names)."""
    first = batches[0]

    def layout(b: ResultBatch) -> tuple:
        return (b.updates.shape[1:], b.updates.dtype, b.updates.device, sorted(b.metrics),
                [(k, v.shape[1:], v.dtype) for k, v in sorted(b.state.items())],
                [(k, v.shape[1:], v.dtype) for k, v in sorted(b.extras.items())])

    if any(layout(b) != layout(first) for b in batches[1:]):
        return None
    at = {j.job_id: i for i, j in enumerate(job for b in batches for job in b.jobs)}
    order = [at[j.job_id] for j in jobs]
    index = torch.as_tensor(order, device=first.updates.device)

    def gather(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts).index_select(0, index)

    steps = np.concatenate([np.broadcast_to(np.asarray(b.steps), len(b)) for b in batches])[order]
    merged = ResultBatch(list(jobs), gather([b.updates for b in batches]),
                         {k: gather([b.state[k] for b in batches]) for k in first.state},
                         {k: gather([b.extras[k] for b in batches]) for k in first.extras}, steps.tolist())
    merged.set_metrics({k: np.concatenate([b.metrics[k] for b in batches])[order].tolist() for k in first.metrics})
    return merged


def stacked_update_rows(results: Sequence[JobResult], rows: Sequence[int] | np.ndarray | None = None) -> Tensor:
    """Returns the updates of `results` (or of its `rows`, in that order) as one ``[m, ...]``
    tensor: an index of a batch's stack, or a stack of the per-result updates."""
    if isinstance(results, ResultBatch):
        if rows is None:
            return results.updates
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=results.updates.device)
        return results.updates.index_select(0, index)
    picked = results if rows is None else [results[int(i)] for i in rows]
    return torch.stack([r.output.update for r in picked])


__all__ = ["ResultBatch", "job_results", "merge_batches", "stacked_update_rows"]
