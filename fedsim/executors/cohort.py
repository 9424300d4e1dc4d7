"""Cohorts: jobs that can run as one vectorised call, stacked into tensors and split back.

Jobs are grouped by everything that fixes a tensor shape: the [K, B] shape of their sample
indices, and the names, shapes and dtypes of their client state and payload extras. Inside
a cohort, a payload tensor that is the *same object* for every job (a synchronous round's
global model) is passed once and broadcast (vmap ``in_dims=None``); otherwise it is stacked
(asynchronous runs: each job started from its own model version).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from ..strategy import ClientOutput, Tensor
from .base import Job


def _shape_sig(tensors: dict[str, Any]) -> tuple:
    return tuple(
        (k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))  # scalars: by value
        for k, v in sorted(tensors.items())
    )


def signature(job: Job) -> Hashable:
    """Returns the key under which jobs can share one vectorised call."""
    p = job.payload
    return (job.indices.shape, (tuple(p.params.shape), _shape_sig(dict(p.extras))),
            _shape_sig(dict(job.state)) if job.state else ())


def group(jobs: Sequence[Job]) -> list[list[Job]]:
    """Splits jobs into groups of equal `signature`, keeping submission order inside a group."""
    if not jobs:
        return []
    first = jobs[0]
    shape = first.indices.shape
    if all(j.payload is first.payload and not j.state and j.indices.shape == shape for j in jobs):
        return [list(jobs)]  # a synchronous round of stateless clients: one cohort
    groups: dict[Hashable, list[Job]] = {}
    payload_sigs: dict[int, Hashable] = {}  # jobs of one round share one payload object
    for job in jobs:
        p = job.payload
        ps = payload_sigs.get(id(p))
        if ps is None:
            ps = payload_sigs[id(p)] = (tuple(p.params.shape), _shape_sig(dict(p.extras)))
        key = (job.indices.shape, ps, _shape_sig(dict(job.state)) if job.state else ())
        groups.setdefault(key, []).append(job)
    return list(groups.values())


@dataclass
class Stacked:
    """A cohort's inputs as tensors, and the vmap ``in_dims`` that go with them."""

    params: Tensor  # [d] when shared, else [n, d]
    extras: dict[str, Any]
    state: dict[str, Tensor]  # each [n, ...]
    indices: np.ndarray  # [n, K, B]
    params_dim: int | None
    extras_dims: dict[str, int | None]

    @property
    def in_dims(self) -> tuple:
        """in_dims for (params, extras, state, x, y, mask)."""
        return (self.params_dim, self.extras_dims, 0, 0, 0, 0)

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


def _shared_or_stacked(values: list[Any], device: torch.device) -> tuple[Any, int | None]:
    first = values[0]
    if all(v is first for v in values) or not isinstance(first, torch.Tensor):
        return (first.to(device) if isinstance(first, torch.Tensor) else first), None
    return torch.stack(values).to(device), 0


def stack(jobs: Sequence[Job], device: torch.device, pad_to: int | None = None) -> Stacked:
    """Stacks a cohort's jobs (same `signature`) onto `device`.

    With `pad_to`, the cohort is padded to that many rows with copies of the first job whose
    sample indices are all −1 (mask 0: they train on nothing and their outputs are dropped).
    """
    n = len(jobs)
    rows = list(jobs) + [jobs[0]] * ((pad_to or n) - n)
    params, pdim = _shared_or_stacked([j.payload.params for j in rows], device)
    extras, edims = {}, {}
    for k in jobs[0].payload.extras:
        extras[k], edims[k] = _shared_or_stacked([j.payload.extras[k] for j in rows], device)
    state = {k: torch.stack([j.state[k] for j in rows]).to(device) for k in jobs[0].state}
    shape = jobs[0].indices.shape  # the same for the whole cohort (its signature)
    indices = np.concatenate([j.indices for j in rows]).reshape(len(rows), *shape)  # 3x faster than np.stack
    if len(rows) > n:
        indices[n:] = -1
    return Stacked(params, extras, state, indices, pdim, edims)


def unstack(out: tuple[Tensor, dict, dict, dict], n: int, device: torch.device) -> tuple[list[ClientOutput], Callable[[], None]]:
    """Splits a vectorised call's outputs (update, state, extras, metrics; each [m ≥ n, ...])
    into n per-job ClientOutputs on `device` (where the jobs' models came from).

    Returns (outputs, fill): the outputs' metric dicts are complete only after ``fill()``,
    which waits for the metrics to reach the host. On CUDA the copy is queued without
    waiting, so the outputs are built while the GPU still computes.

    Updates and extras are views of one copy (short-lived uplinks); each client state is
    cloned, because the runtime may keep it for the rest of the run and a view would pin the
    whole cohort's stack in memory.
    """
    update, state, extras, metrics = out
    update = update[:n].to(device).unbind(0)
    state = {k: v[:n].to(device) for k, v in state.items()}
    extras = {k: v[:n].to(device).unbind(0) for k, v in extras.items()}
    names = list(metrics)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    fill = _metric_filler(names, [metrics[k][:n].detach() for k in names], rows)
    if not state and not extras:  # the common case, kept lean: this runs once per client
        new = tuple.__new__  # ClientOutput(...) without the NamedTuple's Python-level __new__
        return [new(ClientOutput, (u, {}, {}, r)) for u, r in zip(update, rows)], fill
    outputs = [
        ClientOutput(
            update[i],
            {k: v[i].clone() for k, v in state.items()},
            {k: v[i] for k, v in extras.items()},
            rows[i],
        )
        for i in range(n)
    ]
    return outputs, fill


def _metric_filler(names: list[str], columns: list[Tensor], rows: list[dict[str, Any]]) -> Callable[[], None]:
    """Starts moving per-client scalar metrics to the host; returns the function that waits
    for them and writes them into `rows` (one dict per client)."""
    if not names:
        return lambda: None
    on_gpu = columns[0].device.type == "cuda" and all(c.dim() == 1 and c.device == columns[0].device for c in columns)
    if on_gpu:
        stacked = torch.stack([c.to(torch.float64) for c in columns])
        host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    def fill() -> None:
        if on_gpu:
            ready.synchronize()
            values = host.tolist()
        else:
            values = [c.cpu().double().tolist() for c in columns]
        for name, column in zip(names, values):
            for row, value in zip(rows, column):
                row[name] = value

    return fill
