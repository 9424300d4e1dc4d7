"""Stacked results: the vmap executor's `ResultBatch`, the protocols' array path and `MsgBatch`.

The array path must be the per-client path without its objects: a `ResultBatch` reads as
the JobResults the executor used to build, a stacked combine gives FedAvg's per-message sum
bit for bit, and a run whose executor hands back stacked results gives every metric, event
and the final model bit for bit as the same run fed per-client results.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.blocks import weighted_sum
from fedsim.clock import later
from fedsim.errors import DivergenceError
from fedsim.executors.base import Job, JobResult, WorkerSpec
from fedsim.executors.results import ResultBatch, merge_batches, stacked_update_rows
from fedsim.executors.vmap import VmapExecutor
from fedsim.messages import MsgBatch
from fedsim.protocols.base import check_rows_finite
from fedsim.protocols.sync import time_round
from fedsim.protocols.weighting import WEIGHTINGS, aggregation_weight_array, aggregation_weights
from fedsim.staleness import polynomial
from fedsim.strategy import ClientOutput, LocalHP, Msg, Payload
from fedsim.task import Task
from fedsim import vec
from strategies.scaffold import scaffold

from .conftest import digits_config, merge, run_config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _jobs(n: int, payload: Payload, state: bool = False) -> list[Job]:
    return [Job(10 + c, c, 3, payload, {"c": torch.full((8,), float(c))} if state else {},
                np.arange(4 * c, 4 * c + 4).reshape(2, 2), 4 + c) for c in range(n)]


def _executor(strategy=None) -> tuple[VmapExecutor, Task]:
    torch.manual_seed(0)
    task = Task(torch.nn.Linear(3, 2), "classification", {"input_shape": (3,)})
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    ex = VmapExecutor(device="cpu")
    ex.start(WorkerSpec(task, x, y, None, LocalHP(0.1), 0), strategy)
    return ex, task


def test_vmap_returns_a_batch_that_reads_as_the_serial_results():
    from strategies.fedavg import fedavg

    ex, task = _executor(fedavg())
    jobs = _jobs(6, Payload(task.initial_params()))
    batch = ex.run(jobs)
    assert isinstance(batch, ResultBatch) and len(batch) == 6
    assert batch.clients.tolist() == [j.client for j in jobs]
    assert batch.uplink_bytes() == task.initial_params().numel() * 4
    for job, res, row in zip(jobs, batch, range(6)):
        want = ex.serial.run(job)
        assert (res.job_id, res.client, res.version, res.num_samples, res.num_steps) == (
            want.job_id, want.client, want.version, want.num_samples, want.num_steps)
        torch.testing.assert_close(res.output.update, want.output.update, rtol=1e-6, atol=1e-7)
        assert res.output.metrics.keys() == want.output.metrics.keys()
        assert res.output.metrics["train_loss"] == pytest.approx(want.output.metrics["train_loss"], rel=1e-6)
        assert res.output.metrics["train_loss"] == batch.metrics["train_loss"][row]
        assert torch.equal(res.output.update, batch.updates[row])
    assert batch[2] is batch.results()[2] and batch[1:3] == batch.results()[1:3]  # built once


def test_cohorts_of_different_step_counts_merge_into_one_batch_in_job_order():
    ex, task = _executor(scaffold())
    params = task.initial_params()
    payload = Payload(params, {"c": torch.zeros_like(params)})
    steps = [1, 3, 2, 3, 1, 2, 3]  # three cohorts, interleaved
    jobs = [Job(c, 20 - c, 0, payload, {"c": torch.full_like(params, 0.1 * c)},
                np.arange(2 * c, 2 * c + 2 * k).reshape(k, 2) % 40, 9) for c, k in enumerate(steps)]
    batch = ex.run(jobs)
    assert isinstance(batch, ResultBatch) and list(batch.jobs) == jobs and batch.steps == steps
    assert batch.clients.tolist() == [20 - c for c in range(7)]
    for job, res, i in zip(jobs, batch, range(7)):
        want = ex.serial.run(job)
        assert (res.client, res.num_steps) == (want.client, want.num_steps) == (job.client, steps[i])
        torch.testing.assert_close(res.output.update, want.output.update, rtol=1e-5, atol=1e-7)
        # c_i and Δc_i divide the update by Kη (≥ 0.1 here): its rounding, 10× larger
        torch.testing.assert_close(res.output.state["c"], want.output.state["c"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.output.extras["dc"], want.output.extras["dc"], rtol=1e-4, atol=1e-5)
        assert res.output.metrics["train_loss"] == pytest.approx(want.output.metrics["train_loss"], rel=1e-6)


def test_batches_of_different_layouts_do_not_merge():
    jobs = _jobs(4, Payload(torch.zeros(3)))
    a = ResultBatch(jobs[:2], torch.zeros(2, 3), {}, {}, 1)
    b = ResultBatch(jobs[2:], torch.zeros(2, 3, dtype=torch.float64), {}, {}, 2)
    for x in (a, b):
        x.set_metrics({"train_loss": [0.0, 1.0]})
    assert merge_batches([a, b], jobs) is None
    c = ResultBatch(jobs[2:], torch.ones(2, 3), {}, {}, 2)
    c.set_metrics({"train_loss": [2.0, 3.0]})
    merged = merge_batches([a, c], [jobs[3], jobs[0], jobs[2], jobs[1]])
    assert merged.steps == [2, 1, 2, 1] and merged.metrics["train_loss"] == [3.0, 0.0, 2.0, 1.0]
    assert merged.updates[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_batch_state_rows_are_copies_and_extras_views():
    ex, task = _executor(scaffold())
    params = task.initial_params()
    jobs = [Job(c, c, 0, Payload(params, {"c": torch.zeros_like(params)}), {"c": torch.full_like(params, 0.1 * c)},
                np.arange(4 * c, 4 * c + 4).reshape(2, 2), 4) for c in range(5)]
    batch = ex.run(jobs)
    assert isinstance(batch, ResultBatch) and set(batch.state) == {"c"} and set(batch.extras) == {"dc"}
    assert batch.uplink_bytes() == 2 * params.numel() * 4  # the update and Δc
    for i, res in enumerate(batch):
        assert torch.equal(res.output.state["c"], batch.state["c"][i])
        assert res.output.state["c"].untyped_storage().nbytes() == params.numel() * 4  # its own bytes
        assert res.output.extras["dc"].data_ptr() == batch.extras["dc"][i].data_ptr()  # a view
        want = ex.serial.run(jobs[i]).output
        torch.testing.assert_close(res.output.extras["dc"], want.extras["dc"], rtol=1e-5, atol=1e-7)


def test_results_built_before_the_metrics_arrive_get_them():
    batch = ResultBatch(_jobs(3, Payload(torch.zeros(2))), torch.arange(6.0).reshape(3, 2), {}, {}, 2)
    early = batch.results()
    assert [r.output.metrics for r in early] == [{}, {}, {}]
    batch.set_metrics({"train_loss": [0.5, 1.5, 2.5], "norm": [1.0, 2.0, 3.0]})
    assert [r.output.metrics for r in batch] == [{"train_loss": 0.5, "norm": 1.0}, {"train_loss": 1.5, "norm": 2.0},
                                                 {"train_loss": 2.5, "norm": 3.0}]
    assert batch.results() is early


def test_submitted_jobs_fetched_one_by_one_equal_the_batch():
    from strategies.fedavg import fedavg

    ex, task = _executor(fedavg())
    jobs = _jobs(6, Payload(task.initial_params()))
    batch = ex.run(jobs)
    for job in jobs[::-1]:
        ex.submit(job)
    fetched = [ex.result(job.job_id) for job in jobs]
    for a, b in zip(batch, fetched):
        assert a.job_id == b.job_id and torch.equal(a.output.update, b.output.update)
        assert a.output.metrics == b.output.metrics and set(a.output.metrics) == {"train_loss"}


def test_batch_checks_its_rows():
    with pytest.raises(ValueError, match="3 update rows for 2 jobs"):
        ResultBatch(_jobs(2, Payload(torch.zeros(2))), torch.zeros(3, 2), {}, {}, 2)
    batch = ResultBatch(_jobs(2, Payload(torch.zeros(2))), torch.zeros(2, 2), {}, {}, 2)
    with pytest.raises(RuntimeError, match="not reached the host"):
        batch.metrics  # noqa: B018


def test_stacked_update_rows_of_a_batch_and_of_a_list():
    ups = torch.randn(5, 4)
    jobs = _jobs(5, Payload(torch.zeros(4)))
    batch = ResultBatch(jobs, ups, {}, {}, 2)
    batch.set_metrics({})
    listed = [JobResult(j.job_id, j.client, 0, ClientOutput(u, {}, {}, {}), 1, 1) for j, u in zip(jobs, ups)]
    assert stacked_update_rows(batch) is ups
    for rows in (None, [3, 0, 4], np.array([], dtype=np.int64)):
        want = ups if rows is None else ups[list(rows)]
        assert torch.equal(stacked_update_rows(batch, rows), want)
        if rows is None or len(rows):
            assert torch.equal(stacked_update_rows(listed, rows), want)


def _msgs(n: int, d: int, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    ups = (torch.randn(n, d, generator=gen, dtype=dtype) * torch.logspace(-3, 3, d, dtype=dtype)).to(device)
    jobs = _jobs(n, Payload(torch.zeros(d)))
    batch = ResultBatch(jobs, ups, {}, {}, 2)
    batch.set_metrics({"train_loss": [float(i) for i in range(n)]})
    rows = np.random.default_rng(seed).permutation(n)[: max(1, n - 2)]
    weights = np.random.default_rng(seed + 1).random(len(rows))
    staleness = np.random.default_rng(seed + 2).integers(0, 4, len(rows))
    return MsgBatch(batch, rows, weights, staleness, torch.zeros(d))


@pytest.mark.parametrize("n,d", [(1, 7), (2, 5), (37, 300), (200, 64)])
def test_stacked_combine_equals_the_per_message_sum_bitwise(n, d):
    msgs = _msgs(n, d, torch.float64 if d == 5 else torch.float32)
    assert msgs.stacked and len(msgs) == len(msgs.rows)
    reduce = weighted_sum(polynomial(0.5))
    per_message = reduce(list(msgs))  # a plain list: the per-message path
    assert torch.equal(reduce(msgs), per_message)
    for m, i, w, s in zip(msgs, msgs.rows, msgs.weights, msgs.staleness):
        assert isinstance(m, Msg) and m.sender == i and m.weight == w and m.staleness == s
        assert torch.equal(m.update, msgs.results.updates[i]) and m.base is msgs.base
    ref = sum(float(w) * (1 + float(s)) ** -0.5 * msgs.results.updates[i].double()
              for i, w, s in zip(msgs.rows, msgs.weights, msgs.staleness))
    torch.testing.assert_close(reduce(msgs).double(), ref, rtol=1e-5, atol=1e-9)


def test_msg_batch_over_per_client_results_builds_messages():
    msgs = _msgs(6, 4)
    listed = MsgBatch(msgs.results.results(), msgs.rows, msgs.weights, msgs.staleness, msgs.base)
    assert not listed.stacked
    assert torch.equal(listed.updates, msgs.updates)
    assert [m.sender for m in listed] == [m.sender for m in msgs]
    with pytest.raises(ValueError, match="one entry per message"):
        MsgBatch(listed.results, listed.rows, listed.weights[:-1])


@pytest.mark.parametrize("n", [1, 2, 9])
def test_weighted_sum_of_a_stack_equals_that_of_its_rows_bitwise(n):
    stack = torch.randn(n, 33) * 1e3
    w = np.random.default_rng(n).random(n).tolist()
    assert torch.equal(vec.weighted_sum(stack, w), vec.weighted_sum(list(stack), w))
    with pytest.raises(ValueError, match="weights"):
        vec.weighted_sum(stack, w + [1.0])
    with pytest.raises(ValueError, match="no vectors"):
        vec.weighted_sum(stack[:0], [])


@CUDA
def test_weighted_sum_of_a_stack_on_cuda_equals_that_of_its_rows_bitwise(monkeypatch):
    monkeypatch.setattr(vec, "STACK_BYTES", 7 * 1000 * 4)  # several stacks
    stack = torch.randn(50, 1000, device="cuda")
    w = np.random.default_rng(0).random(50).tolist()
    assert torch.equal(vec.weighted_sum(stack, w), vec.weighted_sum(list(stack), w))
    msgs = _msgs(300, 500, device="cuda")
    reduce = weighted_sum()
    assert torch.equal(reduce(msgs), reduce(list(msgs)))


def test_weight_arrays_equal_the_listed_weights():
    clients, samples = [4, 0, 7], [30, 10, 0]
    p = np.linspace(0.05, 0.2, 8)
    for rule in WEIGHTINGS:
        arr = aggregation_weight_array(rule, clients, samples, p, [0.5, 0.25, 0.5])
        assert arr.dtype == np.float64 and arr.tolist() == aggregation_weights(rule, clients, samples, p, [0.5, 0.25, 0.5])
    assert aggregation_weight_array("samples", [1, 2], [0, 0]).tolist() == [0.5, 0.5]
    assert len(aggregation_weight_array("samples", [], [])) == 0
    with pytest.raises(ValueError, match="unknown weighting"):
        aggregation_weight_array("median", clients, samples)
    with pytest.raises(ValueError, match="importances"):
        aggregation_weight_array("unbiased", clients, samples)


def test_check_rows_finite_names_the_client():
    ups = torch.ones(4, 3, 2)
    check_rows_finite(ups, [5, 6, 7, 8], 0, 0)
    big = torch.full((2, 4), 3e38)  # each row's sum overflows to inf: a false alarm, re-checked
    check_rows_finite(big, [0, 1], 0, 0)
    ups[2, 1, 0] = float("nan")
    with pytest.raises(DivergenceError, match="client 7's update has NaN/inf in round 3"):
        check_rows_finite(ups, [5, 6, 7, 8], 3, 0)
    check_rows_finite(torch.zeros(0, 3), [], 0, 0)


def _per_client(monkeypatch):
    """Makes the vmap executor hand back per-client JobResult lists instead of batches."""
    real = VmapExecutor.run

    def listed(self, jobs):
        return list(real(self, jobs))

    monkeypatch.setattr(VmapExecutor, "run", listed)


@pytest.mark.parametrize("extra", [
    {"strategy": {"name": "fedavg"}, "protocol": {"deadline": 0.12, "weighting": "unbiased"},
     "system": {"dropout": {"name": "bernoulli", "p": 0.25}}},
    {"strategy": {"name": "scaffold"}, "protocol": {"weighting": "identical"}},
    {"strategy": {"name": "fedavg", "server_momentum": 0.9, "staleness": {"name": "polynomial"}}, "protocol": {}},
    {"strategy": {"name": "fedadam", "server_lr": 0.05}, "protocol": {}},
], ids=["fedavg-deadline-dropout", "scaffold-state", "server-momentum", "fedadam"])
def test_sync_array_path_equals_per_client_path_bitwise(monkeypatch, tmp_path, extra):
    cfg = merge(digits_config(run={"rounds": 5, "eval_every": 1, "log_events": True, "torch_threads": 1},
                              executor={"kind": "vmap", "device": "cpu"}), extra)
    stacked_sums: list[int] = []  # sums taken over a stacked tensor, not a list of updates
    real_sum = vec.weighted_sum
    monkeypatch.setattr(vec, "weighted_sum",
                        lambda v, w: (isinstance(v, torch.Tensor) and stacked_sums.append(len(v))) or real_sum(v, w))
    a = run_config(cfg, tmp_path / "stacked")
    used = len(stacked_sums)
    with monkeypatch.context() as m:
        _per_client(m)
        b = run_config(cfg, tmp_path / "listed")
    if extra["strategy"]["name"] != "scaffold":  # FedAvg's reducer took the stacks; the listed run never did
        assert used == 5 and len(stacked_sums) == used
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in a.rows]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in b.rows]
    pa, pb = (r.protocol.eval_params(r.ctx, r.final_state) for r in (a, b))
    assert torch.equal(pa, pb)
    events = [(tmp_path / d / "events.jsonl").read_text().splitlines() for d in ("stacked", "listed")]
    assert events[0] == events[1] and len(events[0]) > 20
    kinds = {json.loads(line)["kind"] for line in events[0]}
    assert {"dispatch", "arrival", "aggregate"} <= kinds
    if "deadline" in extra["protocol"]:
        assert {"straggler", "drop"} <= kinds and a.rows[-1]["stragglers"] > 0 and a.rows[-1]["dropped"] > 0
    if extra["strategy"]["name"] == "scaffold":
        assert len(a.ctx.store) > 0


def test_decentralized_array_path_equals_per_client_path_bitwise(monkeypatch):
    from .test_decentralized import dec_config

    cfg = merge(dec_config(system={"dropout": {"name": "bernoulli", "p": 0.3}}, run={"rounds": 3, "eval_every": 1}),
                {"executor": {"kind": "vmap", "device": "cpu"}})
    a = run_config(cfg)
    with monkeypatch.context() as m:
        _per_client(m)
        b = run_config(cfg)
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in a.rows] == [
        {k: v for k, v in r.items() if k != "wall_time"} for r in b.rows]
    assert torch.equal(a.final_state.models, b.final_state.models)


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
