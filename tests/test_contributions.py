"""Contributions: the one columnar type every executor returns and every combine reads.

* every executor's rows equal the serial executor's (the vmap executor's to rounding), in the
  jobs' order, also when cohorts of different step counts ran apart, and fetched one by one;
* `take`, `row` and `concat` keep every column aligned (bases shared or per row);
* a reducer over the columns equals the per-row sum bit for bit, on the CPU and on CUDA;
* the one finiteness check names the first bad sender, and an overflowing sum is no alarm;
* the round timing equals a one-job-at-a-time loop (every instant the exact start plus a
  duration, rounded once); the online participation estimate counts what it has seen.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim import vec
from fedsim.blocks import weighted_sum
from fedsim.clock import later
from fedsim.contributions import Contributions, contributions, from_outputs
from fedsim.errors import ClientJobError, DivergenceError
from fedsim.executors.base import Job, WorkerSpec
from fedsim.executors.serial import SerialExecutor
from fedsim.executors.vmap import VmapExecutor
from fedsim.protocols.clocks import time_round
from fedsim.protocols.weighting import (WEIGHTINGS, aggregation_weight_array, aggregation_weights, count_updates,
                                        online_frequencies)
from fedsim.staleness import polynomial
from fedsim.strategy import ClientOutput, LocalHP, Payload
from fedsim.task import Task
from fedsim.strategies.fedavg import fedavg
from fedsim.strategies.scaffold import scaffold



def _jobs(n: int, payload: Payload, state: bool = False) -> list[Job]:
    return [Job(10 + c, c, 3, payload, {"c": torch.full((8,), float(c))} if state else {},
                np.arange(4 * c, 4 * c + 4).reshape(2, 2), 4 + c) for c in range(n)]


def _spec(strategy_seed: int = 0) -> tuple[WorkerSpec, Task]:
    torch.manual_seed(strategy_seed)
    task = Task(torch.nn.Linear(3, 2), "classification", {"input_shape": (3,)})
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    return WorkerSpec(task, x, y, None, LocalHP(0.1), 0), task


def _executors(strategy, on_client_error: str = "stop"):
    spec, task = _spec()
    serial = SerialExecutor(on_client_error)
    serial.start(spec, strategy)
    vm = VmapExecutor(device="cpu")
    vm.start(spec, strategy)
    return serial, vm, task


def _assert_rows_equal(a: Contributions, b: Contributions, rtol=1e-6, atol=1e-7) -> None:
    for name in ("senders", "num_samples", "num_steps", "jobs", "versions"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    torch.testing.assert_close(a.updates, b.updates, rtol=rtol, atol=atol)
    assert a.extras.keys() == b.extras.keys() and a.state.keys() == b.state.keys()
    for k in a.extras:
        torch.testing.assert_close(a.extras[k], b.extras[k], rtol=100 * rtol, atol=100 * atol)
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=100 * rtol, atol=100 * atol)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        np.testing.assert_allclose(a.metrics[k], b.metrics[k], rtol=1e-5)


def test_vmap_rows_equal_serial_rows_in_the_jobs_order():
    serial, vm, task = _executors(fedavg())
    jobs = _jobs(6, Payload(task.initial_params()))
    got, want = vm.run(jobs), serial.run(jobs)
    assert len(got) == 6 and got.stacked and got.senders.tolist() == [j.client for j in jobs]
    _assert_rows_equal(got, want)
    assert set(got.metrics) == {"train_loss"} and got.metrics["train_loss"].dtype == np.float64
    assert got.uplink_bytes().tolist() == [task.initial_params().numel() * 4] * 6


def test_cohorts_of_different_step_counts_come_back_in_job_order():
    serial, vm, task = _executors(scaffold())
    params = task.initial_params()
    payload = Payload(params, {"c": torch.zeros_like(params)})
    steps = [1, 3, 2, 3, 1, 2, 3]  # three cohorts, interleaved
    jobs = [Job(c, 20 - c, 0, payload, {"c": torch.full_like(params, 0.1 * c)},
                np.arange(2 * c, 2 * c + 2 * k).reshape(k, 2) % 40, 9) for c, k in enumerate(steps)]
    got = vm.run(jobs)
    assert got.jobs.tolist() == list(range(7)) and got.num_steps.tolist() == steps
    # c_i and Δc_i divide the update by Kη (≥ 0.1 here): its rounding, 10× larger
    _assert_rows_equal(got, serial.run(jobs), rtol=1e-5, atol=1e-7)
    assert got.uplink_bytes().tolist() == [2 * params.numel() * 4] * 7  # the update and Δc
    assert [got.row_uplink_bytes(i) for i in range(7)] == got.uplink_bytes().tolist()


def test_submitted_jobs_fetched_one_by_one_equal_the_run():
    serial, vm, task = _executors(fedavg())
    jobs = _jobs(6, Payload(task.initial_params()))
    whole = vm.run(jobs)
    for ex in (vm, serial):
        for job in jobs[::-1]:
            ex.submit(job)
        rows = [ex.result(job.job_id) for job in jobs]
        assert all(len(r) == 1 for r in rows)
        _assert_rows_equal(Contributions.concat(rows), whole)


def test_a_failed_job_leaves_no_row_or_stops_the_run():
    def local(payload, state, batches, grad_fn, hp):
        if int(batches.x.abs().sum() * 1000) % 3 == 0:
            raise ValueError("boom")
        return ClientOutput(payload.params * 0, {}, {}, {})

    strategy = fedavg()._replace(local=local)
    spec, task = _spec()
    jobs = _jobs(6, Payload(task.initial_params()))
    ex = SerialExecutor("drop")
    ex.start(spec, strategy)
    got = ex.run(jobs)
    failed = [j for j in jobs if isinstance(ex._worker.attempt(j), str)]
    assert 0 < len(failed) < 6
    assert got.jobs.tolist() == [j.job_id for j in jobs if j not in failed]
    ex.submit(failed[0])
    assert len(ex.result(failed[0].job_id)) == 0
    stop = SerialExecutor("stop")
    stop.start(spec, strategy)
    with pytest.raises(ClientJobError, match="boom"):
        stop.run(jobs)


def test_take_row_and_concat_keep_the_columns_aligned():
    base = torch.zeros(4)
    c = contributions(torch.arange(20.0).reshape(5, 4), [0.1, 0.2, 0.3, 0.4, 0.0], senders=[7, 3, 9, 1, 5],
                      staleness=[0, 1, 2, 3, 4], num_steps=[1, 2, 3, 4, 5], extras={"dc": torch.eye(5, 4)}, bases=base)
    t = c.take([3, 0])
    assert t.senders.tolist() == [1, 7] and t.updates[:, 0].tolist() == [12.0, 0.0]
    assert t.weights.tolist() == [0.4, 0.1] and t.staleness.tolist() == [3, 0] and t.num_steps.tolist() == [4, 1]
    assert torch.equal(t.extras["dc"], torch.eye(5, 4)[[3, 0]]) and t.bases is base
    assert c.take(range(5)) is c and len(c.take([])) == 0
    r = c.row(2)
    assert r.senders.tolist() == [9] and r.updates.data_ptr() == c.updates[2].data_ptr()  # a view
    other = torch.ones(4)
    more = contributions([torch.ones(4)], [1.0], extras={"dc": [torch.ones(4)]}, bases=other)
    both = Contributions.concat([c.take([1]), more, Contributions.empty()])
    assert both.senders.tolist() == [3, 0] and both.base(0) is base and both.base(1) is other
    assert torch.equal(both.extras["dc"], torch.stack([torch.eye(5, 4)[1], torch.ones(4)]))
    with pytest.raises(ValueError, match="cannot concatenate"):
        Contributions.concat([c, contributions([torch.ones(4)])])
    rows = list(c.take([4, 2]).rows())
    assert [(x.sender, x.weight, x.staleness, x.num_steps) for x in rows] == [(5, 0.0, 4, 5), (9, 0.3, 2, 3)]
    assert rows[0].base is base and torch.equal(rows[1].extras["dc"], torch.eye(5, 4)[2])


def test_split_equals_row_by_row_for_every_column():
    bases = tuple(torch.full((4,), float(i)) for i in range(3))
    c = contributions(torch.arange(12.0).reshape(3, 4), [0.5, 0.25, 0.25], senders=[4, 2, 8], staleness=[2, 0, 1],
                      num_steps=[3, 1, 2], extras={"dc": torch.eye(3, 4)}, bases=bases)
    c = c.replace(state={"m": -torch.eye(3, 4)}, metrics={"train_loss": np.array([0.1, np.nan, 0.3])})
    split = c.split()
    assert len(split) == 3 and Contributions.split(Contributions.empty()) == []
    for i, (a, b) in enumerate(zip(split, (c.row(i) for i in range(3)))):
        for name in Contributions.__slots__:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, dict):
                assert x.keys() == y.keys() and all(np.array_equal(np.asarray(x[k]), np.asarray(y[k]), equal_nan=True)
                                                    for k in x), name
            elif isinstance(x, tuple):
                assert len(x) == 1 and x[0] is y[0], name
            else:
                assert np.array_equal(np.asarray(x), np.asarray(y)) and x.shape == y.shape, name
        assert a.updates.data_ptr() == c.updates[i].data_ptr()  # views, no copies


def test_from_outputs_fills_missing_metrics_with_nan():
    jobs = _jobs(2, Payload(torch.zeros(3)))
    got = from_outputs(jobs, [ClientOutput(torch.ones(3), {}, {}, {"a": 1.0}),
                              ClientOutput(torch.zeros(3), {}, {}, {"a": 2.0, "b": 5.0})])
    assert got.metrics["a"].tolist() == [1.0, 2.0] and np.isnan(got.metrics["b"][0])
    assert got.metric_means() == {"a": 1.5, "b": 5.0}
    assert got.num_steps.tolist() == [2, 2] and got.num_samples.tolist() == [4, 5]


def _random(n: int, d: int, dtype=torch.float32, device="cpu", seed=0) -> Contributions:
    gen = torch.Generator().manual_seed(seed)
    ups = (torch.randn(n, d, generator=gen, dtype=dtype) * torch.logspace(-3, 3, d, dtype=dtype)).to(device)
    rng = np.random.default_rng(seed)
    return contributions(ups, rng.random(n), staleness=rng.integers(0, 4, n))


@pytest.mark.parametrize("n,d", [(1, 7), (2, 5), (37, 300), (200, 64)])
def test_the_column_reducer_equals_the_weighted_sum_of_its_rows_bitwise(n, d):
    # the columns' scaled weights are the rows' weight · s(staleness), to the bit
    c = _random(n, d, torch.float64 if d == 5 else torch.float32)
    s = polynomial(0.5)
    rows = list(c.rows())
    per_row = vec.weighted_sum([row.update for row in rows], [row.weight * s(row.staleness) for row in rows])
    assert torch.equal(weighted_sum(s)(c), per_row)
    ref = sum(w * (1 + float(t)) ** -0.5 * u.double() for u, w, t in zip(c.updates, c.weights, c.staleness))
    torch.testing.assert_close(weighted_sum(s)(c).double(), ref, rtol=1e-5, atol=1e-4)  # fp32 sums of terms up to 1e3


@pytest.mark.parametrize("n", [1, 2, 9])
def test_weighted_sum_of_a_stack_equals_that_of_its_rows_bitwise(n):
    stack = torch.randn(n, 33) * 1e3
    w = np.random.default_rng(n).random(n).tolist()
    assert torch.equal(vec.weighted_sum(stack, w), vec.weighted_sum(list(stack), w))
    with pytest.raises(ValueError, match="weights"):
        vec.weighted_sum(stack, w + [1.0])
    with pytest.raises(ValueError, match="no vectors"):
        vec.weighted_sum(stack[:0], [])


@pytest.mark.cuda
def test_weighted_sum_of_a_stack_on_cuda_equals_that_of_its_rows_bitwise(monkeypatch):
    monkeypatch.setattr(vec, "STACK_BYTES", 7 * 1000 * 4)  # several stacks
    stack = torch.randn(50, 1000, device="cuda")
    w = np.random.default_rng(0).random(50).tolist()
    assert torch.equal(vec.weighted_sum(stack, w), vec.weighted_sum(list(stack), w))
    c = _random(300, 500, device="cuda")
    assert torch.equal(weighted_sum()(c), vec.weighted_sum(list(c.updates), c.weights.tolist()))


def test_weight_arrays_equal_the_listed_weights_and_online_frequencies_count():
    clients, samples = [4, 0, 7], [30, 10, 0]
    p = np.linspace(0.05, 0.2, 8)
    for rule in WEIGHTINGS:
        arr = aggregation_weight_array(rule, clients, samples, p, [0.5, 0.25, 0.5])
        assert arr.dtype == np.float64 and arr.tolist() == aggregation_weights(rule, clients, samples, p, [0.5, 0.25, 0.5])
    assert aggregation_weight_array("samples", [1, 2], [0, 0]).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="unknown weighting"):
        aggregation_weight_array("median", clients, samples)
    counts = np.zeros(5, dtype=np.int64)
    # aggregation 1: clients 0, 2; aggregation 2: 2, 2, 4 (client 2 twice); aggregation 3: 0
    assert online_frequencies(counts, 0, [0, 2]).tolist() == [1.0, 1.0]
    count_updates(counts, [0, 2])
    assert online_frequencies(counts, 1, [2, 2, 4]).tolist() == [1.5, 1.5, 0.5]
    count_updates(counts, [2, 2, 4])
    assert counts.tolist() == [1, 0, 3, 0, 1]
    assert online_frequencies(counts, 2, [0]).tolist() == [2 / 3]


def test_the_finiteness_check_names_the_first_bad_sender():
    ups = torch.ones(4, 3, 2)
    c = contributions(ups, senders=[5, 6, 7, 8])
    c.check_finite(0, 0.0)
    big = torch.full((2, 4), 3e38)  # each row's sum overflows to inf: a false alarm, re-checked
    contributions(big).check_finite(0, 0.0)
    both = torch.zeros(2, 10)
    both[1, 1], both[1, 2] = float("inf"), -float("inf")  # the sum is NaN: still caught
    with pytest.raises(DivergenceError, match="client 1's"):
        contributions(both).check_finite(0, 0.0)
    ups[2, 1, 0] = float("nan")
    ups[3, 0, 0] = float("inf")
    with pytest.raises(DivergenceError, match="client 7's update has NaN/inf in round 3"):
        contributions(ups, senders=[5, 6, 7, 8]).check_finite(3, 0.0)
    Contributions.empty().check_finite(0, 0.0)


def _time_round_loop(t0, residue, clients, durations, lost, lost_at, deadline):
    """The synchronous protocol's round timing, one job at a time (as before it worked on arrays)."""
    arrivals, losses = [], []
    for client, dur, gone, frac in zip(clients.tolist(), durations, lost, lost_at):
        if gone:
            losses.append((later(t0, residue, frac * dur), client))
        else:
            arrivals.append((later(t0, residue, dur), client))
    arrivals.sort(key=lambda a: (a[0][0], a[1]))  # by tick, then client
    cut = later(t0, residue, deadline) if deadline is not None else None
    on_time = [(t, c) for (t, _), c in arrivals if cut is None or t <= cut[0]]
    late = [(t, c) for (t, _), c in arrivals if cut is not None and t > cut[0]]
    end = max([t for t, _ in arrivals] + [t for t, _ in losses] + [(t0, residue)])
    losses = [(t, c) for (t, _), c in losses]
    return on_time, late, losses, end if cut is None else min(end, cut)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31), st.integers(0, 10**12), st.booleans(), st.floats(0.0, 1.0))
def test_round_timing_equals_the_reference_loop(m, seed, t0, with_cut, lost_p):
    rng = np.random.default_rng(seed)
    clients = rng.choice(10 * m, m, replace=False)  # any order: ties break by client id
    residue = float(rng.uniform(-0.5, 0.5))
    # whole ticks (small: ties in arrival time are common) or any seconds
    ns = rng.integers(0, 50, m) * 1e-9
    durations = np.where(rng.random(m) < 0.5, ns, rng.random(m) * 1e-7)
    lost = rng.random(m) < lost_p
    lost_at = np.where(rng.random(m) < 0.2, 0.5, rng.random(m))
    deadline = int(rng.integers(0, 60)) * 1e-9 if with_cut else None
    timing = time_round(t0, residue, clients, durations, lost, lost_at, deadline)
    on_time, late, losses, end = _time_round_loop(t0, residue, clients, durations, lost, lost_at, deadline)
    assert list(zip(timing.on_time_at.tolist(), clients[timing.on_time].tolist())) == on_time
    assert (timing.late, timing.losses, (timing.end, timing.end_residue)) == (late, losses, end)


def test_a_rows_uplink_bytes_without_the_array():
    from fedsim.compressors import sign, topk

    v = torch.linspace(-1, 1, 64)
    messages = (topk(0.1)(v, 0), sign()(v, 0), topk(0.5)(v, 0))  # encoded: each its own size
    extra = {"dc": torch.zeros(3, 10, dtype=torch.float64)}
    for updates in (messages, torch.zeros(3, 64)):
        got = contributions(updates, extras=extra)
        assert [got.row_uplink_bytes(i) for i in range(3)] == got.uplink_bytes().tolist()
    assert len(set(contributions(messages).uplink_bytes().tolist())) == 3
