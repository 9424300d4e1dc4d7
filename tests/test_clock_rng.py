"""Virtual clock ordering and exact ticks; keyed random draws."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from fedsim import rng
from fedsim.clock import TICKS_PER_SECOND, EventQueue, later, later_each, to_seconds, to_ticks
from fedsim.errors import FedsimError

from .conftest import quadratic_config, run_config


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


def test_a_chain_of_durations_is_rounded_once_not_per_job():
    # 5/9 s = 555555555.56 ns: rounded per job, 720 jobs would end 320 ns after 400 s
    tau = 1.0 - 5 * 0.8 / 9
    t, r = 0, 0.0
    for _ in range(720):
        t, r = later(t, r, tau)
        assert -0.5 <= r <= 0.5
    assert t == to_ticks(400.0) and 720 * to_ticks(tau) == t + 320


def test_later_each_is_later_for_each_duration():
    rng = np.random.default_rng(0)
    seconds = np.concatenate([rng.random(500) * 10, np.arange(50) * 1e-9, [0.5e-9, 1.5e-9, 2.5e-9]])
    for start in [(0, 0.0), (123456789, 0.4999), (10**12, -0.5)]:
        ticks, residues = later_each(*start, seconds)
        assert [(int(t), float(r)) for t, r in zip(ticks, residues)] == [later(*start, s) for s in seconds]
    with pytest.raises(FedsimError):
        later(0, 0.0, float("inf"))
    with pytest.raises(FedsimError):
        later_each(0, 0.0, np.array([1.0, float("nan")]))


def test_residues_survive_a_snapshot():
    q = EventQueue()
    t, r = later(0, 0.0, 1 / 3)
    q.push(t, "a", residue=r)
    q.push(t + 1, "b")
    ev = EventQueue.restore(q.snapshot()).pop()
    assert (ev.time, ev.residue) == later(0, 0.0, 1 / 3) and ev.residue != 0.0
    old = {"now": 0, "seq": 1, "events": [(5, 0, 0, "x", {})]}  # written before events kept a residue
    assert EventQueue.restore(old).pop().residue == 0.0


@pytest.mark.parametrize("protocol", [{"name": "sync"}, {"name": "decentralized"}])
def test_rounds_end_at_exact_sums_of_durations(tmp_path, protocol):
    # each round starts where the last one ended; 0.1234567891234 s is not a whole number
    # of ticks, so rounding each round's length would drift a tick every ~4 rounds
    slowest = "0.1234567891234"
    cfg = quadratic_config(
        data={"num_clients": 3}, local={"steps": 1},
        system={"compute": {"name": "linear", "slowest": float(slowest), "spread": 50.0}},
        protocol=protocol, run={"rounds": 12, "log_events": True},
    )
    if protocol["name"] == "decentralized":
        cfg.update(strategy={"name": "dfedavg"}, topology={"name": "ring"})
    run_config(cfg, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    ends = [e["time"] for e in events if e["kind"] in ("aggregate", "gossip")]
    assert ends == [round(k * Fraction(slowest) * TICKS_PER_SECOND) / TICKS_PER_SECOND for k in range(1, 13)]


def test_keyed_draws_depend_on_key_only():
    a = rng.uniform(1, "avail", np.arange(5), 3)
    b = rng.uniform(1, "avail", np.array([4, 3, 2, 1, 0]), 3)[::-1]
    assert np.array_equal(a, b)  # per-id, independent of order and batch
    assert not np.array_equal(a, rng.uniform(1, "avail", np.arange(5), 4))
    assert not np.array_equal(a, rng.uniform(2, "avail", np.arange(5), 3))
    assert rng.numpy_rng(0, "x", 1).integers(1 << 30) == rng.numpy_rng(0, "x", 1).integers(1 << 30)


def test_one_id_is_drawn_as_in_a_batch_bit_for_bit():
    # a single id takes the Python-integer path; a batch the numpy one: the same bits
    ids = np.array([0, 1, 5, 2**40, 2**63 - 1, -1, -(2**63), 123456789], dtype=np.int64)
    batch = rng.uniform(7, "p", ids, 3)
    one_by_one = [rng.uniform(7, "p", np.array([i]), 3) for i in ids] + [rng.uniform(7, "p", int(i), 3) for i in ids]
    assert [x.shape for x in one_by_one] == [(1,)] * len(ids) + [()] * len(ids)
    assert np.array_equal(np.concatenate([x.reshape(1) for x in one_by_one]).view(np.uint64),
                          np.concatenate([batch, batch]).view(np.uint64))
    assert np.array_equal(rng.normal(7, "p", ids), np.concatenate([rng.normal(7, "p", [i]) for i in ids]))


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


def test_counter_generators_equal_numpy_rng_in_any_order():
    from fedsim.rng import CounterRngs, numpy_rng

    gens = CounterRngs(7, "async/dispatch", block=16)
    # in order across block ends, backwards, a far jump and back: every generator starts its own stream
    for c in [*range(40), 5, 39, 1000, 999, 1015, 1016, 10**12, 3]:
        got = gens.get(c)
        ref = numpy_rng(7, "async/dispatch", c)
        assert np.array_equal(got.integers(0, 2**62, size=3), ref.integers(0, 2**62, size=3)), c
        assert np.array_equal(got.permutation(20), ref.permutation(20)), c


def test_one_draw_is_numpy_s_choice_of_one_element():
    from fedsim.rng import draw_one, numpy_rng

    # sizes on both sides of choice's cut-offs (50 elements; 10,000 for its tail shuffle)
    pools = [np.arange(n, dtype=np.int64) * 3 + 1 for n in (2, 3, 17, 50, 51, 500, 9999, 10_001, 300_000)]
    for t in range(3000):
        pool = pools[t % len(pools)]
        ref = numpy_rng(3, "draw", t).choice(pool, 1, replace=False)
        assert np.array_equal(draw_one(numpy_rng(3, "draw", t), pool), ref), (t, len(pool))
