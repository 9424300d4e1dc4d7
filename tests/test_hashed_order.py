"""Hashed batch orders (`local.shuffle: hash`): the cohort computation a device runs equals the
host's job-by-job computation bit for bit (CPU always, CUDA where present), shapes equal the
generator orders', each pass is a uniform permutation, and runs give the same results on the
serial executor (orders drawn on the host) and the vmap executor (orders drawn by the
executor for whole cohorts)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedsim.data.batching import job_indices
from fedsim.data.hashed_order import DeviceOrders, job_indices_hashed, job_keys, mix32

from .conftest import digits_config, merge
from .test_vmap_protocols import assert_same_run, cohort_sizes  # noqa: F401 - fixture

SIZES = [0, 1, 3, 7, 10, 16, 33, 50, 51]
SETTINGS = list(itertools.product([4, 10], [1, 3], [None, 5], ["epoch", "replacement"], [False, True]))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def population() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out, offset = [], 0
    for n in SIZES * 2:
        out.append((offset + rng.permutation(n)).astype(np.int64))
        offset += n
    return out


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_devices_cohort_orders_equal_the_hosts_job_by_job(device, static):
    # static: buffers per bucketed shape (sample counts and passes padded to powers of two),
    # replayed as CUDA graphs on CUDA; each shape is called twice, with other jobs and fewer
    # live rows the second time, so a replay that kept the first call's inputs or output fails
    clients = population()
    rng = np.random.default_rng(1)
    for b, epochs, steps, sampling, drop_last in SETTINGS:
        orders = DeviceOrders(clients, b, epochs, steps, sampling, drop_last, seed=7, device=torch.device(device),
                              static=static)
        cohorts: dict[tuple, list[int]] = {}
        for c, ids in enumerate(clients):
            shape = orders.shape(c)
            assert shape == job_indices(ids, b, epochs, steps, sampling, drop_last, np.random.default_rng(0)).shape
            cohorts.setdefault(shape, []).append(c)
        for shape, members in cohorts.items():
            for cs in (np.array(members), np.array(members[::-1][: max(1, len(members) - 1)])):
                rows = len(members) + 2
                jobs = rng.integers(0, 2**40, len(cs))  # job ids beyond 32 bits too
                got = orders.cohort(cs, jobs, rows=rows).cpu().numpy()
                assert got.shape[0] == rows
                for i, (c, j) in enumerate(zip(cs, jobs)):
                    ref = job_indices_hashed(clients[c], b, epochs, steps, sampling, drop_last,
                                             job_keys(7, int(c), int(j)))
                    assert np.array_equal(got[i], ref), (int(c), int(j), b, epochs, steps, sampling, drop_last)
                assert (got[len(cs):] == -1).all()  # padding rows
        if static:
            assert 0 < len(orders._static) <= len(cohorts)  # one static entry per shape (bucketing merges some)


def test_static_orders_keep_a_bounded_number_of_shapes():
    from fedsim.data.hashed_order import STATIC_SHAPES

    clients = population()
    orders = DeviceOrders(clients, 4, 1, None, "epoch", False, seed=3, device=torch.device("cpu"), static=True)
    cs = np.array([c for c, ids in enumerate(clients) if len(ids) == 10])
    for rows in range(len(cs), len(cs) + STATIC_SHAPES + 4):  # a new padded size each call: eager past the cap
        got = orders.cohort(cs, np.arange(len(cs)) + rows, rows=rows).numpy()
        for i, c in enumerate(cs):
            ref = job_indices_hashed(clients[c], 4, 1, None, "epoch", False, job_keys(3, int(c), i + rows))
            assert np.array_equal(got[i], ref)
        assert (got[len(cs):] == -1).all()
    assert len(orders._static) == STATIC_SHAPES


def test_static_orders_leave_large_sorts_eager(monkeypatch):
    import fedsim.data.hashed_order as hashed_order

    clients = population()
    cs = np.array([c for c, ids in enumerate(clients) if len(ids) == 50])  # sorts of 64 positions a row
    monkeypatch.setattr(hashed_order, "STATIC_ELEMENTS", 64 * len(cs))
    orders = DeviceOrders(clients, 10, 1, None, "epoch", False, seed=3, device=torch.device("cpu"), static=True)
    for rows, kept in ((len(cs), 1), (len(cs) + 1, 1)):  # the second sorts 64 more keys than allowed
        got = orders.cohort(cs, np.arange(len(cs)), rows=rows).numpy()
        assert len(orders._static) == kept
        for i, c in enumerate(cs):
            assert np.array_equal(got[i], job_indices_hashed(clients[c], 10, 1, None, "epoch", False,
                                                             job_keys(3, int(c), i)))


def test_hashes_agree_between_numpy_torch_and_python_ints():
    x = np.array([0, 1, 2**31, 2**32 - 1, 123456789], dtype=np.int64)
    want = [mix32(int(v)) for v in x]
    assert mix32(x).tolist() == want == mix32(torch.from_numpy(x)).tolist()
    assert all(0 <= v < 2**32 for v in want)
    c, j = np.array([0, 5, 2**33 + 1]), np.array([7, 2**40, 3])
    assert job_keys(3, c, j).tolist() == job_keys(3, torch.from_numpy(c), torch.from_numpy(j)).tolist() \
        == [job_keys(3, int(a), int(b)) for a, b in zip(c, j)]


def test_each_pass_is_a_permutation_and_orders_are_uniform():
    ids = np.arange(100, 103)
    counts: dict[tuple, int] = {}
    jobs = 6000
    for job in range(jobs):
        out = job_indices_hashed(ids, 3, 2, None, "epoch", False, job_keys(0, 4, job))
        assert sorted(out[0].tolist()) == sorted(out[1].tolist()) == [100, 101, 102]  # every sample once a pass
        counts[tuple(out[0])] = counts.get(tuple(out[0]), 0) + 1
    assert len(counts) == 6
    sigma = math.sqrt(jobs / 6 * 5 / 6)
    assert all(abs(v - jobs / 6) < 5 * sigma for v in counts.values()), counts
    # the two passes of a job are drawn independently: they differ about 5 times in 6
    differ = sum(not np.array_equal(*job_indices_hashed(ids, 3, 2, None, "epoch", False, job_keys(0, 4, j)))
                 for j in range(600))
    assert 400 < differ < 600


def hashed(cfg: dict) -> dict:
    return merge(cfg, {"local": {"shuffle": "hash"}})


def _static_shapes(run) -> int:
    static = run.ctx.device_orders._static
    return 0 if static is None else len(static)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static buffers"])
def test_serial_and_vmap_give_the_same_run_with_hashed_orders(cohort_sizes, monkeypatch, graphs):  # noqa: F811
    # the vmap executor draws its cohorts' orders itself: the host-side path must not be used;
    # with executor.graphs the orders run on static buffers per cohort shape (CUDA graphs on CUDA)
    calls = []
    real = DeviceOrders.host
    monkeypatch.setattr(DeviceOrders, "host", lambda self, *a: calls.append(a) or real(self, *a))
    cfg = hashed(digits_config(local={"epochs": 2}, run={"rounds": 2, "eval_every": 1, "torch_threads": 1}))
    _, vm = assert_same_run(cfg, cohort_sizes, graphs=graphs)
    assert calls == []
    assert (_static_shapes(vm) > 0) == graphs


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static buffers"])
def test_async_runs_agree_with_hashed_orders(cohort_sizes, graphs):  # noqa: F811
    # asynchronous cohorts vary in size: padded to a few sizes, each a static shape of the orders
    cfg = hashed(digits_config(local={"steps": 3, "sampling": "replacement"}, run={"rounds": 6, "eval_every": 3,
                                                                                    "torch_threads": 1}))
    cfg["protocol"] = {"name": "async", "concurrency": 4, "buffer_size": 2}
    _, vm = assert_same_run(cfg, cohort_sizes, graphs=graphs)
    assert (_static_shapes(vm) > 0) == graphs


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_bulk_deferred_jobs_equal_job_by_job(strategy):
    from fedsim.config import load_config
    from fedsim.runner import build

    cfg = hashed(digits_config(strategy={"name": strategy}, executor={"kind": "vmap", "device": "cpu"}))
    ctx = build(load_config(cfg)).ctx
    assert ctx.device_orders is not None
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    clients = [5, 0, 7, 2]
    bulk = ctx.make_jobs(clients, payload, 3, [10, 11, 12, 13])
    for job, c, j in zip(bulk, clients, [10, 11, 12, 13]):
        one = ctx.make_job(c, payload, 3, j)
        assert (job.job_id, job.client, job.version, job.num_samples) == (one.job_id, one.client, one.version,
                                                                           one.num_samples)
        assert job.indices.shape == one.indices.shape and np.array_equal(np.asarray(job.indices), np.asarray(one.indices))
        assert job.state.keys() == one.state.keys()
        assert all(torch.equal(job.state[k], one.state[k]) for k in job.state)
