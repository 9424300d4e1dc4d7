"""Byzantine-robust reducers: pure functions from a stack of updates ``[m, d]`` to one vector ``[d]``.

Each reducer replaces the mean of the clients' updates by an estimate that a few arbitrary
("Byzantine") rows cannot move far. They read rows only, not the protocol's weights: a
Byzantine client could lie about its sample count.

* `coordinate_median` — per coordinate, the median of the m values (Yin et al., ICML 2018);
  for even m the mean of the two middle values.
* `trimmed_mean` — per coordinate, drop the k = ⌊β·m⌋ largest and k smallest values and
  average the rest (Yin et al. 2018).
* `krum_scores`, `krum` — Krum (Blanchard et al., NeurIPS 2017): row i's score is the sum of
  its squared distances to its m − f − 2 nearest other rows; Krum returns the row of lowest
  score, multi-Krum the mean of the `select` rows of lowest scores.
* `bulyan` — Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018): pick θ = m − 2f rows by
  repeated Krum (each pick removed from the pool), then per coordinate average the
  β = θ − 2f values closest to the coordinate's median among the picked rows.
* `centered_clip` — centered clipping (Karimireddy, He, Jaggi, ICML 2021):
  v ← v + (1/m) Σ_i clip_τ(u_i − v), `iters` times, from a center v₀ (the previous
  aggregate), with clip_τ(z) = z·min(1, τ/‖z‖).

Deviations, for small aggregations (asynchronous buffers): Krum uses
max(m − f − 2, 1) neighbours, Bulyan max(m − 2f, 1) picks and max(θ − 2f, 1) values per
coordinate, so every reducer is defined for any m ≥ 1; their guarantees need m > 2f + 2
(Krum) and m ≥ 4f + 3 (Bulyan).

`REDUCERS` registers them by name for the ``robust`` strategy wrapper (strategies/robust.py);
a reducer factory returns a `Reducer`: ``(updates [m, d], center [d]) -> [d]``.
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch

from .config import Ge, Gt, Range
from .registry import Registry

Tensor = torch.Tensor
Reducer = Callable[[Tensor, Tensor], Tensor]  # (updates [m, d], center [d]) -> aggregate [d]
REDUCERS = Registry("robust reducer", ["fedsim.robust"])


def clip_to_norm(z: Tensor, radius: Tensor | float) -> Tensor:
    """Returns each row of `z` (``[..., d]``) scaled to L2 norm at most `radius`: z·min(1, radius/‖z‖).
    `radius` may be one number or one per row (``[...]``)."""
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    radius = torch.as_tensor(radius, dtype=z.dtype, device=z.device)
    if radius.dim():
        radius = radius.unsqueeze(-1)
    return z * torch.clamp(radius / torch.clamp(norm, min=torch.finfo(z.dtype).tiny), max=1.0)


def mean(updates: Tensor) -> Tensor:
    """Returns the plain (unweighted) mean of the rows: the non-robust baseline."""
    return updates.mean(dim=0)


def coordinate_median(updates: Tensor) -> Tensor:
    """Returns the coordinate-wise median of the rows (mean of the two middle values for even m)."""
    return updates.quantile(0.5, dim=0) if updates.dtype in (torch.float32, torch.float64) else updates.median(dim=0).values


def trimmed_mean(updates: Tensor, trim: float) -> Tensor:
    """Returns the coordinate-wise β-trimmed mean: per coordinate the mean of the values left
    after dropping the k = ⌊β·m⌋ largest and k smallest (at least one value is kept)."""
    m = updates.shape[0]
    k = min(int(trim * m), (m - 1) // 2)
    ordered = updates.sort(dim=0).values
    return ordered[k:m - k].mean(dim=0)


def krum_scores(updates: Tensor, f: int) -> Tensor:
    """Returns each row's Krum score ``[m]``: the sum of squared L2 distances to its
    max(m − f − 2, 1) nearest other rows (0 for a single row)."""
    m = updates.shape[0]
    if m == 1:
        return torch.zeros(1, dtype=updates.dtype, device=updates.device)
    dist = torch.cdist(updates.unsqueeze(0), updates.unsqueeze(0)).squeeze(0).square()
    dist.fill_diagonal_(float("inf"))
    k = min(max(m - f - 2, 1), m - 1)
    return dist.topk(k, dim=1, largest=False).values.sum(dim=1)


def krum_select(updates: Tensor, f: int, select: int) -> Tensor:
    """Returns the indices of the `select` rows of lowest Krum score (ties: the lower index)."""
    scores = krum_scores(updates, f)
    return torch.argsort(scores, stable=True)[:min(select, updates.shape[0])]


def krum(updates: Tensor, f: int, select: int = 1) -> Tensor:
    """Returns Krum's choice (``select`` = 1) or the multi-Krum mean of the `select` best rows."""
    return updates[krum_select(updates, f, select)].mean(dim=0)


def bulyan(updates: Tensor, f: int) -> Tensor:
    """Returns Bulyan's aggregate with Krum as the selection rule (see the module docstring)."""
    m = updates.shape[0]
    theta = max(m - 2 * f, 1)
    pool = torch.arange(m, device=updates.device)
    picked = []
    for _ in range(theta):
        best = krum_select(updates[pool], f, 1)[0]
        picked.append(pool[best])
        pool = torch.cat([pool[:best], pool[best + 1:]])
    chosen = updates[torch.stack(picked)]
    beta = max(theta - 2 * f, 1)
    med = coordinate_median(chosen)
    closest = (chosen - med).abs().topk(beta, dim=0, largest=False).indices
    return chosen.gather(0, closest).mean(dim=0)


def centered_clip(updates: Tensor, center: Tensor, tau: float, iters: int = 1) -> Tensor:
    """Returns centered clipping's aggregate: v ← v + mean_i clip_τ(u_i − v), `iters` times from `center`."""
    v = center
    for _ in range(iters):
        v = v + clip_to_norm(updates - v, tau).mean(dim=0)
    return v


# ---------------------------------------------------------------- registered reducers
F = Annotated[int, Ge(0)]


@REDUCERS.register("mean")
def mean_reducer() -> Reducer:
    """The plain unweighted mean of the updates (no robustness; a baseline)."""
    return lambda u, center: mean(u)


@REDUCERS.register("median")
def median_reducer() -> Reducer:
    """Coordinate-wise median (Yin et al. 2018)."""
    return lambda u, center: coordinate_median(u)


@REDUCERS.register("trimmed_mean")
def trimmed_mean_reducer(trim: Annotated[float, Range(0.0, 0.5, open_hi=True)] = 0.1) -> Reducer:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Args:
        trim: β, the fraction of values dropped at each end per coordinate (k = ⌊β·m⌋).
    """
    return lambda u, center: trimmed_mean(u, trim)


@REDUCERS.register("krum")
def krum_reducer(f: F = 1, select: Annotated[int, Ge(1)] = 1) -> Reducer:
    """Krum / multi-Krum (Blanchard et al. 2017).

    Args:
        f: Number of Byzantine clients tolerated per aggregation.
        select: Rows averaged: 1 is Krum, more is multi-Krum.
    """
    return lambda u, center: krum(u, f, select)


@REDUCERS.register("bulyan")
def bulyan_reducer(f: F = 1) -> Reducer:
    """Bulyan over Krum (El Mhamdi et al. 2018); guarantees need m ≥ 4f + 3 rows.

    Args:
        f: Number of Byzantine clients tolerated per aggregation.
    """
    return lambda u, center: bulyan(u, f)


@REDUCERS.register("centered_clip")
def centered_clip_reducer(tau: Annotated[float, Gt(0)] = 1.0, iters: Annotated[int, Ge(1)] = 1) -> Reducer:
    """Centered clipping (Karimireddy et al. 2021) around the previous aggregate.

    Args:
        tau: Clipping radius τ of each row's distance to the center.
        iters: Clipping iterations per aggregation.
    """
    return lambda u, center: centered_clip(u, center, tau, iters)


__all__ = ["REDUCERS", "Reducer", "bulyan", "centered_clip", "clip_to_norm", "coordinate_median", "krum",
           "krum_scores", "krum_select", "mean", "trimmed_mean"]
