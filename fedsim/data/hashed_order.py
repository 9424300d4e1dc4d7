"""Batch orders from a counter-based keyed hash (``local.shuffle: hash``): the same indices
from numpy on the host and from torch on any device, so a GPU can draw a cohort's batches
itself while every executor still trains on the same samples.

A job's key k is a 32-bit hash of (seed, client, job id). Pass q of the job (an epoch, or
a step under ``sampling: replacement``) visits the client's n samples in the order of the
stable argsort of h(k, q, p) over positions p = 0..n−1. Every hash is a chain of murmur3's
32-bit finaliser over int64 values using only +, *, ^, >> and &: numpy and torch evaluate
those identically on every device (products wrap modulo 2^64 and only the low 32 bits are
kept), and both sorts are stable, so ties fall to the lower position in both.

The shapes and padding are those of `batching.job_indices` (the default, generator-based
order): only the permutations differ.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..rng import M32, combine, key, mix32

_PAST_END = 1 << 33  # sort key of a padding position: after every 32-bit hash
STATIC_SHAPES = 16  # most cohort shapes whose orders `DeviceOrders` keeps static buffers (CUDA graphs) for
STATIC_ELEMENTS = 1 << 20  # largest sort (rows × passes × positions) kept so: a graph holds its intermediates


def seed_key(seed: int) -> int:
    """Returns the run's 63-bit key for hashed batch orders."""
    return key(seed, "batches/hash")


def job_keys(seed: int, clients: Any, job_ids: Any) -> Any:
    """Returns each job's 32-bit order key, elementwise over int64 arrays or tensors (or Python ints)."""
    s = seed_key(seed)
    h = combine(combine(mix32(s & M32), s >> 32), clients)  # Python ints until `clients` joins
    h = combine(combine(h, clients >> 32), job_ids)
    return combine(h, job_ids >> 32)


def sort_keys(keys: Any, passes: Any, positions: Any) -> Any:
    """Returns h(k, q, p) elementwise (broadcasting numpy or torch int64 operands; scalars
    as Python ints, whose arithmetic is exact, never numpy scalars, which warn on wrapping)."""
    return combine(combine(keys, passes), positions)


def plan(n: int, batch_size: int, epochs: int, steps: int | None, sampling: str, drop_last: bool) -> tuple[int, int]:
    """Returns the [K, B] shape of a job over n samples (equal to `job_indices`'s)."""
    b = batch_size
    if n == 0:
        return 0, b
    if sampling == "replacement":
        return (steps if steps is not None else epochs * max(1, -(-n // b))), b
    if steps is not None:
        return steps, b
    if epochs <= 0:
        return 0, b
    full, rest = divmod(n, b)
    tail = 1 if rest and not (drop_last and full) else 0
    return epochs * (full + tail), b


def job_indices_hashed(client_indices: np.ndarray, batch_size: int, epochs: int, steps: int | None,
                       sampling: str, drop_last: bool, order_key: int) -> np.ndarray:
    """Returns the [K, B] sample indices of one job (−1 = padding), ordered by the keyed hash."""
    n = len(client_indices)
    k, b = plan(n, batch_size, epochs, steps, sampling, drop_last)
    if k == 0:
        return np.zeros((0, b), dtype=np.int64)
    ids = np.asarray(client_indices, dtype=np.int64)
    positions = np.arange(n, dtype=np.int64)

    def order(q: int) -> np.ndarray:
        return np.argsort(sort_keys(int(order_key), q, positions), kind="stable")

    if sampling != "replacement" and steps is not None:  # passes concatenated until K full batches
        need = k * b
        return ids[np.concatenate([order(q) for q in range(-(-need // n))])[:need]].reshape(k, b)
    passes, slots = (k, b) if sampling == "replacement" else (epochs, k * b // epochs)
    out = np.full((passes, slots), -1, dtype=np.int64)
    take = min(n, slots)
    for q in range(passes):
        out[q, :take] = ids[order(q)[:take]]
    return out.reshape(k, b)


class DeviceOrders:
    """A population's sample lists on a device, from which whole cohorts' hashed batch
    orders are computed there (equal to `job_indices_hashed` job by job).

    With `static`, a cohort's orders are computed on buffers kept per shape, and on CUDA
    replayed as a CUDA graph: the ~200 small kernels of the hash and sort cost one launch
    (they took ~1.5 ms of host time per round on an H100, half of a small model's round).
    Shapes are bucketed (sample counts and passes to powers of two, which only adds padding
    positions that sort last), at most `STATIC_SHAPES` of them, each sorting at most
    `STATIC_ELEMENTS` keys (a captured graph keeps its intermediates in GPU memory for as long
    as it lives; a large sort costs more on the GPU than its launches); others run eagerly."""

    def __init__(self, client_train: list[np.ndarray], batch_size: int, epochs: int, steps: int | None,
                 sampling: str, drop_last: bool, seed: int, device: torch.device, static: bool = False):
        counts = np.fromiter((len(c) for c in client_train), dtype=np.int64, count=len(client_train))
        starts = np.zeros(len(counts), dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        self.counts = counts
        self.client_train = client_train
        flat = np.concatenate(client_train).astype(np.int64) if len(client_train) else np.zeros(0, np.int64)
        self.last = max(0, len(flat) - 1)
        self.flat = torch.from_numpy(flat).to(device)
        self.starts = torch.from_numpy(starts).to(device)
        self.counts_dev = torch.from_numpy(counts).to(device)
        self.settings = (batch_size, epochs, steps, sampling, drop_last)
        self.seed = seed
        self.device = device
        self._shapes: dict[int, tuple[int, int]] = {}
        self._static = None
        if static:
            from ..executors.graphs import StaticCohortRunner

            self._static = StaticCohortRunner(capture=torch.device(device).type == "cuda")

    def shape(self, client: int) -> tuple[int, int]:
        """The [K, B] shape of a job of `client`."""
        return self.shape_for(int(self.counts[client]))

    def shape_for(self, n: int) -> tuple[int, int]:
        """The [K, B] shape of a job over n samples (remembered per n)."""
        shape = self._shapes.get(n)
        if shape is None:
            shape = self._shapes[n] = plan(n, *self.settings)
        return shape

    def host(self, client: int, job_id: int) -> np.ndarray:
        """One job's indices computed on the host (the reference the device path equals)."""
        return job_indices_hashed(self.client_train[client], *self.settings, job_keys(self.seed, client, job_id))

    def cohort(self, clients: np.ndarray, job_ids: np.ndarray, rows: int | None = None) -> torch.Tensor:
        """Returns the [rows, K, B] int64 indices of jobs (clients[i], job_ids[i]) on the device,
        all of one shape (a cohort); rows beyond len(clients) are padding (all −1)."""
        m = len(clients)
        rows = m if rows is None else rows
        k, b = self.shape(int(clients[0]))
        dev = self.device
        if k == 0:
            return torch.full((rows, 0, b), -1, dtype=torch.int64, device=dev)
        _, epochs, steps, sampling, _ = self.settings
        counts_host = self.counts[clients]
        nmax = int(counts_host.max())
        sequential = sampling != "replacement" and steps is not None
        if sequential:
            passes = int(-(-(k * b) // int(counts_host.min())))
        else:
            passes = k if sampling == "replacement" else epochs
        runner = self._static
        if runner is not None:
            shape = (rows, k, b, _pow2(nmax), _pow2(passes) if sequential else passes, sequential)
            small = rows * shape[3] * shape[4] <= STATIC_ELEMENTS
            if small and (shape in runner or len(runner) < STATIC_SHAPES):
                c = np.full(rows, clients[0], dtype=np.int64)
                j = np.full(rows, job_ids[0], dtype=np.int64)
                c[:m], j[:m] = clients, job_ids
                inputs = tuple(torch.from_numpy(a).to(dev, non_blocking=True) for a in (c, j, np.array(m)))
                out = runner.run(shape, lambda: self._padded_fn(*shape), inputs)
                return out.clone()  # the static buffer is overwritten by the next call of this shape
        c = torch.from_numpy(np.asarray(clients, dtype=np.int64)).to(dev, non_blocking=True)
        j = torch.from_numpy(np.asarray(job_ids, dtype=np.int64)).to(dev, non_blocking=True)
        out = self._orders(c, j, k, b, nmax, passes, sequential)
        if rows > m:
            out = torch.cat([out, torch.full((rows - m, k, b), -1, dtype=torch.int64, device=dev)])
        return out

    def _padded_fn(self, rows: int, k: int, b: int, nmax: int, passes: int, sequential: bool):
        """The static path's function of (clients, job ids, live rows): `_orders` of all rows,
        rows from `live` on set to −1."""
        def fn(c: torch.Tensor, j: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
            out = self._orders(c, j, k, b, nmax, passes, sequential)
            keep = torch.arange(rows, device=c.device) < live
            return torch.where(keep[:, None, None], out, -1)

        return fn

    def _orders(self, c: torch.Tensor, j: torch.Tensor, k: int, b: int, nmax: int, passes: int,
                sequential: bool) -> torch.Tensor:
        """The [len(c), K, B] indices of jobs (c[i], j[i]) (device tensors), sorting `nmax`
        positions per pass (at least every job's sample count) over `passes` passes (at least
        the jobs need); no host synchronisation (CUDA-graph capturable)."""
        dev = c.device
        m = c.shape[0]
        _, epochs, _, sampling, _ = self.settings
        n = self.counts_dev[c]
        start = self.starts[c]
        keys = job_keys(self.seed, c, j)
        q = torch.arange(passes, dtype=torch.int64, device=dev)
        p = torch.arange(nmax, dtype=torch.int64, device=dev)
        h = sort_keys(keys[:, None, None], q[None, :, None], p[None, None, :])
        h = torch.where(p[None, None, :] < n[:, None, None], h, _PAST_END)
        order = torch.sort(h, dim=-1, stable=True).indices  # [m, passes, nmax]
        if sequential:
            t = torch.arange(k * b, dtype=torch.int64, device=dev)[None, :]
            pos = order[torch.arange(m, device=dev)[:, None], t // n[:, None], t % n[:, None]]
            out = self.flat[start[:, None] + pos]
        else:
            slots = b if sampling == "replacement" else k * b // epochs
            t = torch.arange(slots, dtype=torch.int64, device=dev)
            pos = order[:, :, t.clamp(max=nmax - 1)]  # [m, passes, slots]
            valid = t[None, :] < n.clamp(max=slots)[:, None]
            at = (start[:, None, None] + pos).clamp(max=self.last)  # positions past a client's end: masked below
            out = torch.where(valid[:, None, :], self.flat[at], -1)
        return out.reshape(m, k, b)


def _pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << max(0, (n - 1).bit_length())


class DeferredIndices:
    """A job's hashed batch order, left for the executor to compute with its cohort on its
    device (`DeviceOrders.cohort`); ``np.asarray`` of it computes it on the host instead."""

    __slots__ = ("orders", "client", "job_id", "shape")

    def __init__(self, orders: DeviceOrders, client: int, job_id: int, shape: tuple[int, int]):
        self.orders, self.client, self.job_id, self.shape = orders, client, job_id, shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.orders.host(self.client, self.job_id)
        return out if dtype is None else out.astype(dtype)

    def __reduce__(self):  # travels as the array it stands for
        return (np.asarray, (np.asarray(self),))
