"""Virtual clock ordering and exact ticks; keyed random draws."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim import rng
from fedsim.clock import EventQueue, to_seconds, to_ticks


def test_events_pop_by_time_then_priority_then_insertion():
    q = EventQueue()
    q.push(5, "b", priority=1)
    q.push(5, "a", priority=0)
    q.push(3, "first")
    q.push(5, "c", priority=0)
    kinds = [q.pop().kind for _ in range(4)]
    assert kinds == ["first", "a", "c", "b"]
    assert q.now == 5


def test_cannot_schedule_in_the_past():
    q = EventQueue()
    q.push(10, "x")
    q.pop()
    with pytest.raises(ValueError):
        q.push(9, "y")


def test_snapshot_restore_keeps_order():
    q = EventQueue()
    for t in (7, 2, 9, 2):
        q.push(t, f"e{t}")
    q.pop()
    r = EventQueue.restore(q.snapshot())
    assert [r.pop().time for _ in range(3)] == [2, 7, 9]


def test_ticks_make_window_membership_exact():
    # 0.6 is 3 windows of 0.2 exactly in ticks, while 0.2+0.2+0.2 != 0.6 in floats.
    assert 0.2 + 0.2 + 0.2 != 0.6
    assert to_ticks(0.2) * 3 == to_ticks(0.6)
    window = to_ticks(0.2)
    assert math.ceil(to_ticks(0.6) / window) == 3
    assert to_seconds(to_ticks(1.25)) == 1.25


def test_keyed_draws_depend_on_key_only():
    a = rng.uniform(1, "avail", np.arange(5), 3)
    b = rng.uniform(1, "avail", np.array([4, 3, 2, 1, 0]), 3)[::-1]
    assert np.array_equal(a, b)  # per-id, independent of order and batch
    assert not np.array_equal(a, rng.uniform(1, "avail", np.arange(5), 4))
    assert not np.array_equal(a, rng.uniform(2, "avail", np.arange(5), 3))
    assert rng.numpy_rng(0, "x", 1).integers(1 << 30) == rng.numpy_rng(0, "x", 1).integers(1 << 30)


def test_uniform_and_normal_laws():
    u = rng.uniform(0, "law", np.arange(200_000))
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    z = rng.normal(0, "law", np.arange(200_000))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


def test_bulk_seeded_generators_equal_one_by_one():
    from fedsim.rng import _pcg64_seeds, numpy_rng, numpy_rngs

    keys = np.array([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1], dtype=np.uint64)  # one- and two-word seeds
    for k, seeded in zip(keys.tolist(), _pcg64_seeds(keys)):
        state = np.random.PCG64(k).state["state"]
        assert seeded == (state["state"], state["inc"])
    clients, jobs = np.arange(300) % 17, np.arange(300) * 7 + 3
    bulk = [(g.permutation(50), g.random(3)) for g in numpy_rngs(5, "batches", clients, jobs)]
    for (perm, r), c, j in zip(bulk, clients, jobs):
        ref = numpy_rng(5, "batches", c, j)
        assert np.array_equal(perm, ref.permutation(50)) and np.array_equal(r, ref.random(3))


def test_bulk_keys_equal_key_row_by_row():
    from fedsim.rng import key, keys

    a, b, c = np.arange(-5, 45), np.arange(50) * 2**40, [True, False] * 25
    assert keys(7, "p", a) == [key(7, "p", x) for x in a]
    assert keys(7, "batches", a, b) == [key(7, "batches", x, y) for x, y in zip(a, b)]
    assert keys(2**40, "x\x1fy", a, b, c) == [key(2**40, "x\x1fy", x, y, z) for x, y, z in zip(a, b, c)]
    assert keys(1, "p") == [] and keys(1, "p", []) == []
