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
