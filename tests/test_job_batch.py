"""A dispatch's jobs as columns (`JobBatch`): the jobs it stands for equal `make_job`'s on
every path (keyed generators, hashed orders on the host, hashed orders on the executor's
device), it behaves as a sequence of them (slices, `take`, pickling), executors give the same
results for it as for the list of its jobs, and a synchronous round on the vmap executor
builds no per-client `Job` object."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.executors.base import Job
from fedsim.executors.cohort import group
from fedsim.executors.job_batch import JobBatch, PayloadRows
from fedsim.executors.vmap import VmapExecutor
from fedsim.runner import build, drive
from fedsim.strategy import Payload

from .conftest import digits_config
from .test_vmap_executor import spec_of

PATHS = {  # (local.shuffle, executor): where the batch's sample indices come from
    "generator": ("generator", {"kind": "serial"}),
    "hashed on the host": ("hash", {"kind": "serial"}),
    "hashed on the device": ("hash", {"kind": "vmap", "device": "cpu"}),
}


def context(path: str, strategy: str = "fedavg", **sections):
    shuffle, executor = PATHS[path]
    cfg = digits_config(strategy={"name": strategy}, executor=executor, **sections)
    cfg["local"]["shuffle"] = shuffle
    return build(load_config(cfg)).ctx


def assert_same_job(a: Job, b: Job) -> None:
    assert (a.job_id, a.client, a.version, a.num_samples, a.num_steps) == (b.job_id, b.client, b.version,
                                                                           b.num_samples, b.num_steps)
    assert a.payload is b.payload
    assert np.array_equal(np.asarray(a.indices), np.asarray(b.indices))
    assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
@pytest.mark.parametrize("path", list(PATHS))
def test_a_batchs_jobs_equal_make_job(path, strategy):
    ctx = context(path, strategy)
    assert (ctx.device_orders is not None) == (path == "hashed on the device")
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    clients, ids = [5, 0, 7, 2, 5], [10, 11, 12, 13, 14]
    batch = ctx.make_jobs(clients, payload, 3, ids)
    assert isinstance(batch, JobBatch) and len(batch) == 5
    assert (batch.states is None) == (strategy == "fedavg")
    assert batch.indices is None if path == "hashed on the device" else len(batch.indices) == 5
    for job, c, j in zip(batch, clients, ids):
        assert_same_job(job, ctx.make_job(c, payload, 3, j))
    assert batch.num_steps.tolist() == [ctx.make_job(c, payload, 3, j).num_steps for c, j in zip(clients, ids)]


def test_per_job_payloads_stay_per_job():
    ctx = context("generator")
    payloads = [Payload(ctx.initial_params + i) for i in range(3)]
    batch = ctx.make_jobs([1, 2, 3], payloads, 0, [0, 1, 2])
    assert batch.shared_payload is None
    assert [j.payload for j in batch] == payloads
    assert JobBatch.of(list(batch)).shared_payload is None


@pytest.mark.parametrize("path", list(PATHS))
def test_rows_slices_and_pickles_are_its_jobs(path):
    ctx = context(path, "scaffold")
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    batch = ctx.make_jobs([4, 1, 6, 3], payload, 2, [20, 21, 22, 23])
    jobs = list(batch)
    for a, b in zip(batch.take([3, 0]), [jobs[3], jobs[0]]):
        assert_same_job(a, b)
    for a, b in zip(batch[1:3], jobs[1:3]):
        assert_same_job(a, b)
    assert_same_job(batch[-1], jobs[3])
    with pytest.raises(IndexError):
        batch[4]
    for a, b in zip(JobBatch.of(jobs), jobs):  # and back from the jobs
        assert_same_job(a, b)
    shipped = pickle.loads(pickle.dumps(batch))  # travels as its jobs (to Ray actors), indices as arrays
    assert isinstance(shipped, list) and len(shipped) == 4
    for a, b in zip(shipped, jobs):
        assert (a.job_id, a.client) == (b.job_id, b.client)
        assert isinstance(a.indices, np.ndarray) and np.array_equal(a.indices, np.asarray(b.indices))
        assert torch.equal(a.payload.params, b.payload.params)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
@pytest.mark.parametrize("path", ["generator", "hashed on the device"])
def test_the_vmap_executor_gives_a_batch_what_it_gives_its_jobs(path, strategy):
    shuffle, _ = PATHS[path]
    cfg = digits_config(strategy={"name": strategy}, executor={"kind": "vmap", "device": "cpu"})
    cfg["local"]["shuffle"] = shuffle
    ctx = build(load_config(cfg)).ctx
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    batch = ctx.make_jobs(np.arange(8), payload, 0, np.arange(8))  # uneven clients: several cohorts
    assert len({tuple(s) for s in batch.shapes.tolist()}) > 1
    a, b = ctx.executor.run(batch), ctx.executor.run(list(batch))
    assert a.jobs.tolist() == list(range(8)) == b.jobs.tolist()
    assert np.array_equal(a.senders, b.senders) and np.array_equal(a.num_steps, b.num_steps)
    assert np.array_equal(a.num_samples, b.num_samples) and np.array_equal(a.versions, b.versions)
    assert torch.equal(a.updates, b.updates)
    assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    c = ctx.executor.run(batch.take([6, 1, 3]))  # other cohorts: equal to rounding
    assert c.jobs.tolist() == [6, 1, 3]
    want = a.updates[[6, 1, 3]]
    assert float((c.updates - want).abs().max() / want.abs().max()) <= 1e-6


def test_a_synchronous_round_builds_no_job_per_client(monkeypatch):
    cfg = digits_config(executor={"kind": "vmap", "device": "cpu"},
                        protocol={"name": "sync", "clients_per_round": 8}, data={"partition": "iid"})
    cfg["local"]["shuffle"] = "hash"
    cfg["run"].update(rounds=3, eval_every=3)
    built = []
    real_init = Job.__init__

    def counted(self, *args, **kwargs):
        built.append(args[1] if len(args) > 1 else kwargs.get("client"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Job, "__init__", counted)
    run = build(load_config(cfg))
    assert run.ctx.device_orders is not None
    drive(run, None, progress=False)
    # the executor looks at each cohort's first job (its signature), nothing per client
    assert 0 < len(built) <= 3 * 2, built


@pytest.mark.parametrize("graphs", [False, True])  # True: padded static buffers
def test_stacked_payloads_run_as_their_rows(graphs):
    ctx = context("generator")
    gen = torch.Generator().manual_seed(3)
    models = ctx.initial_params + 0.05 * torch.randn((8, ctx.initial_params.numel()), generator=gen)
    rows = PayloadRows(models)
    assert len(rows) == 8 and torch.equal(rows[2].params, models[2]) and torch.equal(rows[-1].params, models[7])
    batch = ctx.make_jobs(np.arange(8), rows, 0, np.arange(8))
    listed = ctx.make_jobs(np.arange(8), [Payload(models[i]) for i in range(8)], 0, np.arange(8))
    part = batch.take([5, 2, 6])
    assert isinstance(part.payloads, PayloadRows) and torch.equal(part.payloads.params, models[[5, 2, 6]])
    run = build(load_config(digits_config()))
    ex = VmapExecutor(device="cpu", graphs=graphs)
    ex.start(spec_of(run), run.ctx.strategy)
    a, b = ex.run(batch), ex.run(listed)  # several cohorts (uneven clients), padded with graphs
    assert torch.equal(a.updates, b.updates) and a.jobs.tolist() == list(range(8))
    c = ex.run(part)
    want = a.updates[[5, 2, 6]]
    assert float((c.updates - want).abs().max() / want.abs().max()) <= 1e-6


def test_a_stateful_round_is_one_cohort_unless_its_states_differ_in_shape():
    ctx = context("hashed on the device", "scaffold", data={"partition": "iid"})
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    batch = ctx.make_jobs(np.arange(6), payload, 0, np.arange(6))
    assert batch.states is not None and batch.one_shape() is not None
    assert group(batch) == [batch]  # the batch itself: no signature per job
    odd = list(batch.states)
    odd[4] = {k: v[:-1] for k, v in odd[4].items()}  # one state of another shape: its own cohort
    split = group(JobBatch(batch.clients, batch.job_ids, batch.versions, batch.num_samples, batch.shapes,
                           batch.payloads, odd, batch.indices, batch.orders))
    assert [c.job_ids.tolist() for c in split] == [[0, 1, 2, 3, 5], [4]]


def test_jobs_from_a_few_model_versions_stack_as_their_rows():
    # an asynchronous cohort: its jobs start from three versions (each with a control variate
    # as SCAFFOLD's payload carries); each distinct model moves once and is gathered per row
    from fedsim.executors.cohort import stack

    versions = [Payload(torch.full((6,), float(v)), {"c": torch.full((6,), -float(v))}) for v in range(3)]
    order = [0, 1, 1, 2, 0, 2, 2, 1]
    jobs = [Job(i, i, order[i], versions[order[i]], {}, np.arange(4).reshape(2, 2), 4) for i in range(len(order))]
    st = stack(JobBatch.of(jobs), torch.device("cpu"))
    assert st.params_dim == 0 and st.extras_dims == {"c": 0}
    assert torch.equal(st.params, torch.stack([versions[v].params for v in order]))
    assert torch.equal(st.extras["c"], torch.stack([versions[v].extras["c"] for v in order]))
    padded = stack(JobBatch.of(jobs), torch.device("cpu"), pad_to=10)  # padding rows repeat the first job's
    assert torch.equal(padded.params, torch.stack([versions[v].params for v in order + [0, 0]]))
