"""Partitioners assign every sample exactly once (where they should), and skew follows alpha."""
from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.base import PartitionContext
from fedsim.data.partition import dirichlet_per_class, dirichlet_per_client, iid, shards

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 10 classes


def ctx(seed=0, n=20):
    return PartitionContext(LABELS, n, np.random.default_rng(seed), 10)


@pytest.mark.parametrize("fn,kwargs", [(iid, {}), (dirichlet_per_class, {"alpha": 0.3}), (shards, {"shards_per_client": 2})])
def test_every_sample_exactly_once(fn, kwargs):
    parts = fn(ctx(), **kwargs)
    assert len(parts) == 20
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))


def skew(parts) -> float:
    """Mean total-variation distance between a client's label histogram and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    d = []
    for p in parts:
        if len(p):
            h = np.bincount(LABELS[p], minlength=10) / len(p)
            d.append(0.5 * np.abs(h - glob).sum())
    return float(np.mean(d))


@pytest.mark.parametrize("fn", [dirichlet_per_class, dirichlet_per_client])
def test_dirichlet_skew_grows_as_alpha_falls(fn):
    alphas = [100.0, 1.0, 0.1]
    skews = [np.mean([skew(fn(ctx(seed), alpha=a)) for seed in range(5)]) for a in alphas]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.25 and skews[2] > 0.6  # 50–100 samples per client: sampling noise at α = 100


def test_dirichlet_per_client_equal_sizes_and_alpha_zero():
    parts = dirichlet_per_client(ctx(), alpha=0.0)
    assert {len(p) for p in parts} == {50}
    for i, p in enumerate(parts):
        assert set(LABELS[p]) == {i % 10}


def test_shards_give_about_two_classes():
    parts = shards(ctx(), shards_per_client=2)
    assert np.mean([len(set(LABELS[p])) for p in parts]) <= 2.5


def test_min_size_is_respected_or_refused():
    parts = dirichlet_per_class(ctx(), alpha=0.05, min_size=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValueError):
        dirichlet_per_class(ctx(n=200), alpha=0.01, min_size=6, max_tries=3)


def _job_indices_reference(client_indices, b, epochs, drop_last, rng):
    """The epoch sampler as first written (one array per pass, concatenated): the reference
    the faster one must reproduce draw for draw."""
    n = len(client_indices)
    if n == 0:
        return np.zeros((0, b), dtype=np.int64)
    rows = []
    for _ in range(epochs):
        perm = client_indices[rng.permutation(n)]
        full = n // b
        if full:
            rows.append(perm[: full * b].reshape(full, b))
        rest = n - full * b
        if rest and not (drop_last and full):
            last = np.full((1, b), -1, dtype=np.int64)
            last[0, :rest] = perm[full * b :]
            rows.append(last)
    return np.concatenate(rows) if rows else np.zeros((0, b), dtype=np.int64)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_epoch_batches_equal_the_reference_sampler(dtype):
    from fedsim.data.batching import job_indices

    cases = [(n, b, e, d) for n in (0, 1, 5, 16, 17, 64, 70) for b in (1, 4, 16, 20) for e in (0, 1, 2, 3)
             for d in (False, True)]
    for n, b, epochs, drop_last in cases:
        idx = np.arange(100, 100 + n, dtype=dtype)
        got = job_indices(idx, b, epochs, None, "epoch", drop_last, np.random.default_rng(n * 7 + b))
        want = _job_indices_reference(idx, b, epochs, drop_last, np.random.default_rng(n * 7 + b))
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), (n, b, epochs, drop_last)
