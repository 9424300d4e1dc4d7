"""Cohorts: jobs that can run as one vectorised call, stacked into tensors and split back.

Jobs are grouped by everything that fixes a tensor shape: the [K, B] shape of their sample
indices, and the names, shapes and dtypes of their client state and payload extras. Inside
a cohort, a payload tensor that is the *same object* for every job (a synchronous round's
global model) is passed once and broadcast (vmap ``in_dims=None``); otherwise it is stacked
(asynchronous runs: each job started from its own model version). Models that come in
equal blocks of consecutive jobs (a vectorised sweep's runs, each with its own global model)
are stacked once per block, and the executor broadcasts each within its block.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_map

from ..strategy import Tensor
from .base import Job
from .job_batch import JobBatch, PayloadRows, all_same
from ..compressors import split_messages
from ..contributions import Contributions
from ..vec import stack_on


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


def group(jobs: Sequence[Job]) -> list[JobBatch]:
    """Splits jobs into cohorts of equal `signature`, keeping submission order inside a cohort."""
    batch = JobBatch.of(jobs)
    if not len(batch):
        return []
    if batch.shared_payload is not None and batch.one_shape() is not None and _one_layout(batch.states):
        return [batch]  # a synchronous round: one cohort, found without a signature per job
    payloads, states = batch.payload_list(), batch.state_list()
    groups: dict[Hashable, list[int]] = {}
    payload_sigs: dict[int, Hashable] = {}  # jobs of one round share one payload object
    for i, (p, st, shape) in enumerate(zip(payloads, states, batch.shapes.tolist())):
        ps = payload_sigs.get(id(p))
        if ps is None:
            ps = payload_sigs[id(p)] = (tuple(p.params.shape), _shape_sig(dict(p.extras)))
        key = (tuple(shape), ps, _shape_sig(dict(st)) if st else ())
        groups.setdefault(key, []).append(i)
    if len(groups) == 1:
        return [batch]
    return [batch.take(rows) for rows in groups.values()]


def _one_layout(states: Sequence[dict[str, Any]] | None) -> bool:
    """True when every state has the same names, and under each name tensors of one shape
    and dtype (or there are no states): C-level loops, one per name."""
    if states is None:
        return True
    first = states[0]
    names = first.keys()
    if not all(isinstance(v, torch.Tensor) for v in first.values()) or [s.keys() for s in states].count(names) != len(states):
        return False
    n = len(states)
    for k, v in first.items():
        column = [s[k] for s in states]
        if not all(isinstance(t, torch.Tensor) for t in column):
            return False
        if [t.shape for t in column].count(v.shape) != n or [t.dtype for t in column].count(v.dtype) != n:
            return False
    return True


@dataclass
class Stacked:
    """A cohort's inputs as tensors, and the vmap ``in_dims`` that go with them."""

    params: Tensor  # [d] when shared, [n / block, d] in blocks, else [n, d]
    extras: dict[str, Any]
    state: dict[str, Tensor]  # each [n, ...]
    indices: np.ndarray | Tensor  # [n, K, B]; a tensor on the device when it computed hashed orders
    params_dim: int | None
    extras_dims: dict[str, int | None]
    params_block: int | None = None  # rows per block: each of `params`' rows serves that many jobs in turn

    @property
    def in_dims(self) -> tuple:
        """in_dims for (params, extras, state, x, y, mask)."""
        return (self.params_dim, self.extras_dims, 0, 0, 0, 0)

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


def block_size(values: Sequence[Any]) -> int | None:
    """Returns m when `values` are blocks of m ≥ 2 consecutive entries, each block one object,
    with at least two blocks (a vectorised sweep's runs, each its own global model); else None."""
    n = len(values)
    m = next((i for i, v in enumerate(values) if v is not values[0]), n)
    if m < 2 or m == n or n % m:
        return None
    firsts = values[::m]
    return m if all(map(operator.is_, values, [v for v in firsts for _ in range(m)])) else None


def _shared_or_stacked(values: list[Any], device: torch.device) -> tuple[Any, int | None]:
    """One value for every row (in_dim None), or the rows stacked on `device` (in_dim 0).
    Rows that share a few tensors (an asynchronous cohort's jobs start from a few model
    versions) move each distinct tensor once and are gathered where they land."""
    first = values[0]
    if all_same(values) or not isinstance(first, torch.Tensor):
        return (first.to(device) if isinstance(first, torch.Tensor) else first), None
    position: dict[int, int] = {}
    distinct: list[Tensor] = []
    which = []
    for v in values:
        at = position.setdefault(id(v), len(distinct))
        if at == len(distinct):
            distinct.append(v)
        which.append(at)
    if 2 * len(distinct) > len(values):
        return torch.stack(values).to(device), 0
    return torch.stack(distinct).to(device).index_select(0, torch.tensor(which, device=device)), 0


def stack(jobs: JobBatch, device: torch.device, pad_to: int | None = None) -> Stacked:
    """Stacks a cohort's jobs (same `signature`) onto `device`.

    With `pad_to`, the cohort is padded to that many rows with copies of the first job whose
    sample indices are all −1 (mask 0: they train on nothing and their outputs are dropped).
    """
    jobs = JobBatch.of(jobs)
    n = len(jobs)
    size = pad_to or n
    shared = jobs.shared_payload
    if shared is not None:  # a synchronous round: the global model and its extras, once
        params, pdim = shared.params.to(device), None
        extras = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in shared.extras.items()}
        edims: dict[str, int | None] = dict.fromkeys(extras)
        block = None
    elif isinstance(jobs.payloads, PayloadRows):  # one model per job, already stacked (gossip)
        stacked = jobs.payloads.params
        if size > n:
            stacked = torch.cat([stacked, stacked[:1].expand(size - n, *stacked.shape[1:])])
        params, pdim, extras, edims, block = stacked.to(device), 0, {}, {}, None
    else:
        rows = jobs.payload_list()
        rows += rows[:1] * (size - n)
        models = [p.params for p in rows]
        block = None if all_same(models) else block_size(models)
        if block is None:
            params, pdim = _shared_or_stacked(models, device)
        else:
            params, pdim = torch.stack(models[::block]).to(device), 0
        extras, edims = {}, {}
        for k in rows[0].extras:
            extras[k], edims[k] = _shared_or_stacked([p.extras[k] for p in rows], device)
    state: dict[str, Tensor] = {}
    if jobs.states is not None:
        states = list(jobs.states)
        states += states[:1] * (size - n)
        state = {k: stack_on([st[k] for st in states], device) for k in states[0]}  # stored (CPU) and fresh rows
    if jobs.indices is None:  # hashed orders: the whole cohort's, computed on its device
        indices = jobs.orders.cohort(jobs.clients, jobs.job_ids, rows=size)
        return Stacked(params, extras, state, indices, pdim, edims, block)
    shape = tuple(int(v) for v in jobs.shapes[0])  # the same for the whole cohort (its signature)
    parts = list(jobs.indices)
    parts += parts[:1] * (size - n)
    indices = np.concatenate(parts).reshape(size, *shape)  # 3x faster than np.stack
    if size > n:
        indices[n:] = -1
    return Stacked(params, extras, state, indices, pdim, edims, block)


def unstack(out: tuple[Tensor, dict, dict, dict], jobs: JobBatch, device: torch.device,
            steps: int) -> tuple[Contributions, Callable[[], None]]:
    """Keeps a vectorised call's outputs (update, state, extras, metrics; each [m ≥ n, ...])
    as the `Contributions` of the cohort's n = len(jobs) jobs, on `device` (where the jobs'
    models came from).

    Returns (contributions, fill): their metric columns arrive with ``fill()``, which waits
    for them to reach the host. On CUDA the copy is queued without waiting, so later cohorts
    (and the host's bookkeeping) proceed while the GPU still computes. Until ``fill()`` ran
    the value must not leave the executor.
    """
    n = len(jobs)
    update, state, extras, metrics = out
    names = list(metrics)
    columns = {k: np.full(n, np.nan) for k in names}  # written in place by fill(): rows split before it see them
    contribs = Contributions(jobs.clients.copy(), _rows(update, n, device), jobs.num_samples.copy(),
                             np.full(n, steps, dtype=np.int64), jobs.job_ids.copy(), jobs.versions.copy(),
                             {k: v[:n].to(device) for k, v in extras.items()},
                             {k: v[:n].to(device) for k, v in state.items()}, columns)
    return contribs, _metric_filler(names, [metrics[k][:n].detach() for k in names], columns)


def _rows(update: Any, n: int, device: torch.device) -> Any:
    """The first n rows of a vectorised call's updates on `device`: a tensor [n, ...], or, for
    encoded messages (`fedsim.compressors`, pytrees whose fields vmap stacked), a tuple of
    n messages, as a serial executor returns them."""
    if isinstance(update, torch.Tensor):
        return update[:n].to(device)
    return tuple(split_messages(tree_map(lambda leaf: leaf[:n].to(device), update), n))


def _metric_filler(names: list[str], values: list[Tensor], columns: dict[str, np.ndarray]) -> Callable[[], None]:
    """Starts moving per-client scalar metrics to the host; returns the function that waits
    for them and writes them into `columns` (name -> float64 array, written in place)."""
    if not names:
        return lambda: None
    on_gpu = values[0].device.type == "cuda" and all(c.dim() == 1 and c.device == values[0].device for c in values)
    if on_gpu:
        stacked = torch.stack([c.to(torch.float64) for c in values])
        host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()

    def fill() -> None:
        if on_gpu:
            ready.synchronize()
            rows = host.numpy().copy()
        else:
            rows = [c.detach().cpu().double().reshape(-1).numpy() for c in values]
        for name, row in zip(names, rows):
            columns[name][:] = row

    return fill
