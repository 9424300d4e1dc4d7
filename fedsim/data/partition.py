"""Partitioners: how training samples are split among clients.

Each returns one index array per client (into the source's training set). Dirichlet label
skew comes in the two variants the literature mixes up, named apart:

* ``dirichlet_per_class`` (variant A; Yurochkin et al. 2019, NIID-Bench, FedHyper, DFedSAM):
  for each class c, p_c ~ Dir(α·1_N) splits that class's samples among clients. Every
  sample is assigned exactly once; client sizes differ.
* ``dirichlet_per_client`` (variant B; Hsu et al. 2019, Fraboni et al.): each client draws
  class proportions π_i ~ Dir(α·1_C) and ⌊N_total/M⌋ samples with replacement from the
  class pools in those proportions (α = 0: client i gets class i mod C only).
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np

from ..config import Ge, Gt
from ..registry import PARTITIONERS
from .base import PartitionContext


@PARTITIONERS.register("iid")
def iid(ctx: PartitionContext) -> list[np.ndarray]:
    """Shuffles the samples and deals them into near-equal client shards."""
    perm = ctx.rng.permutation(len(ctx.labels))
    return [np.sort(p) for p in np.array_split(perm, ctx.num_clients)]


@PARTITIONERS.register("dirichlet_per_class")
def dirichlet_per_class(
    ctx: PartitionContext,
    alpha: Annotated[float, Gt(0)] = 0.5,
    min_size: Annotated[int, Ge(0)] = 1,
    max_tries: Annotated[int, Ge(1)] = 1000,
) -> list[np.ndarray]:
    """Label skew, variant A: each class is split among clients by p_c ~ Dir(α·1_N).

    Args:
        alpha: Concentration α; small α = each client dominated by few classes, α → ∞ ≈ IID.
        min_size: Redraw the whole split until every client holds at least this many samples.
        max_tries: Give up (with an error) after this many redraws.
    """
    labels = ctx.labels
    n = ctx.num_clients
    if min_size * n > len(labels):
        raise ValueError(f"min_size {min_size} × {n} clients exceeds the {len(labels)} samples")
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in classes:
            idx = ctx.rng.permutation(np.flatnonzero(labels == c))
            p = ctx.rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].append(part)
        out = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValueError(f"no split with every client >= {min_size} samples after {max_tries} draws; raise alpha or lower min_size")


@PARTITIONERS.register("dirichlet_per_client")
def dirichlet_per_client(
    ctx: PartitionContext,
    alpha: Annotated[float, Ge(0)] = 0.5,
) -> list[np.ndarray]:
    """Label skew, variant B: client i draws π_i ~ Dir(α·1_C), then ⌊N/M⌋ samples with replacement.

    Args:
        alpha: Concentration α; 0 gives every client a single class (client i: class i mod C).
    """
    labels = ctx.labels
    classes = np.unique(labels)
    pools = [np.flatnonzero(labels == c) for c in classes]
    per_client = len(labels) // ctx.num_clients
    if per_client < 1:
        raise ValueError(f"{len(labels)} samples cannot give {ctx.num_clients} clients one sample each")
    out = []
    for i in range(ctx.num_clients):
        if alpha == 0:
            pi = np.zeros(len(classes))
            pi[i % len(classes)] = 1.0
        else:
            pi = ctx.rng.dirichlet(np.full(len(classes), alpha))
        counts = ctx.rng.multinomial(per_client, pi)
        parts = [ctx.rng.choice(pool, size=k, replace=True) for pool, k in zip(pools, counts) if k]
        out.append(np.sort(np.concatenate(parts)))
    return out


@PARTITIONERS.register("shards")
def shards(
    ctx: PartitionContext,
    shards_per_client: Annotated[int, Ge(1)] = 2,
) -> list[np.ndarray]:
    """Pathological split (McMahan et al. 2017): sort by label, cut into equal shards, deal them out.

    Args:
        shards_per_client: Shards s per client; most clients then see about s classes.
    """
    num_shards = ctx.num_clients * shards_per_client
    if num_shards > len(ctx.labels):
        raise ValueError(f"{num_shards} shards need at least that many samples, have {len(ctx.labels)}")
    order = np.argsort(ctx.labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    assign = ctx.rng.permutation(num_shards).reshape(ctx.num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assign]


def client_sizes(total: int, weights: np.ndarray, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Returns client sizes summing to `total`: `min_size` each, the rest drawn multinomially
    in proportion to `weights`."""
    n = len(weights)
    if min_size * n > total:
        raise ValueError(f"min_size {min_size} × {n} clients exceeds the {total} samples")
    return min_size + rng.multinomial(total - min_size * n, weights / weights.sum())


@PARTITIONERS.register("quantity_skew")
def quantity_skew(
    ctx: PartitionContext,
    distribution: Literal["lognormal", "power_law", "dirichlet"] = "lognormal",
    sigma: Annotated[float, Gt(0)] = 1.0,
    exponent: Annotated[float, Gt(0)] = 1.5,
    alpha: Annotated[float, Gt(0)] = 0.5,
    min_size: Annotated[int, Ge(0)] = 1,
) -> list[np.ndarray]:
    """Quantity skew: IID samples, client sizes drawn from a heavy-tailed law.

    Client i gets weight w_i — 'lognormal': w_i ~ LogNormal(0, σ²) (LEAF, FedProx's
    Synthetic); 'power_law': w_i ~ Pareto(a) with x_m = 1 (P(w > t) = t^−a); 'dirichlet':
    (w_1..w_N) ~ Dir(α·1_N) (NIID-Bench). Each client holds `min_size` samples plus a
    multinomial share of the rest in proportion to w_i; every sample goes to one client.

    Args:
        distribution: The law of the client weights: 'lognormal', 'power_law' or 'dirichlet'.
        sigma: σ of the log-normal law (larger = more skewed).
        exponent: Pareto exponent a of the power law (smaller = heavier tail).
        alpha: Dirichlet concentration α (smaller = more skewed).
        min_size: Samples every client holds at least.
    """
    n, total = ctx.num_clients, len(ctx.labels)
    if distribution == "lognormal":
        weights = ctx.rng.lognormal(0.0, sigma, n)
    elif distribution == "power_law":
        weights = ctx.rng.pareto(exponent, n) + 1.0
    else:
        weights = ctx.rng.dirichlet(np.full(n, alpha))
    sizes = client_sizes(total, weights, min_size, ctx.rng)
    perm = ctx.rng.permutation(total)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


@PARTITIONERS.register("classes_per_client")
def classes_per_client(
    ctx: PartitionContext,
    k: Annotated[int, Ge(1)] = 2,
) -> list[np.ndarray]:
    """Pathological label skew (#C = k, NIID-Bench; flwr-datasets' PathologicalPartitioner):
    every client holds exactly k classes.

    Client i gets class i mod C and k − 1 further distinct classes drawn at random; each
    class's samples are shuffled and split evenly among the clients that hold it. A class no
    client drew is left out (with k·N < C).

    Args:
        k: Classes per client (at most the number of classes).
    """
    classes = np.unique(ctx.labels)
    if k > len(classes):
        raise ValueError(f"k={k} exceeds the {len(classes)} classes of the data")
    held: list[list[int]] = []
    for i in range(ctx.num_clients):
        first = i % len(classes)
        others = ctx.rng.choice(np.delete(np.arange(len(classes)), first), size=k - 1, replace=False)
        held.append([first, *others.tolist()])
    shards: list[list[np.ndarray]] = [[] for _ in range(ctx.num_clients)]
    for c, label in enumerate(classes):
        owners = [i for i, h in enumerate(held) if c in h]
        if owners:
            idx = ctx.rng.permutation(np.flatnonzero(ctx.labels == label))
            for owner, part in zip(owners, np.array_split(idx, len(owners))):
                shards[owner].append(part)
    return [np.sort(np.concatenate(s)) for s in shards]


@PARTITIONERS.register("auto")
def auto(ctx: PartitionContext) -> list[np.ndarray]:
    """The source's natural split when it has one (synthetic, quadratic, leaf, a user column), IID otherwise."""
    return natural(ctx) if ctx.groups is not None else iid(ctx)


@PARTITIONERS.register("natural")
def natural(ctx: PartitionContext) -> list[np.ndarray]:
    """The source's own per-user split (synthetic, quadratic, leaf, npz/csv user columns): user i is client i."""
    if ctx.groups is None:
        raise ValueError("this data source has no natural split; choose iid, dirichlet_per_class, ...")
    if len(ctx.groups) < ctx.num_clients:
        raise ValueError(f"the source has {len(ctx.groups)} users, fewer than data.num_clients={ctx.num_clients}")
    return [np.asarray(g) for g in ctx.groups[: ctx.num_clients]]
