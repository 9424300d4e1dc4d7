"""The inside of a Ray actor, without Ray: read-only numpy data in, the Worker's exact result out."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fedsim.config import load_config
from fedsim.executors.ray_actor import CohortRunner, JobRunner, from_wire
from fedsim.runner import build

from .conftest import digits_config


def test_job_runner_matches_the_worker():
    run = build(load_config(digits_config(strategy={"name": "fedavg", "server_momentum": 0.5})))
    ctx = run.ctx
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    job = ctx.make_job(3, payload, version=0, job_id=7)
    x, y = ctx.data.x_train.numpy().copy(), ctx.data.y_train.numpy().copy()
    x.flags.writeable = y.flags.writeable = False  # as an object-store array arrives
    spec = replace(ctx.executor._worker.spec, x_train=torch.empty(0), y_train=torch.empty(0))
    runner = JobRunner(spec, x, y, threads=torch.get_num_threads(), gpu_fraction=0.0)
    got = runner.run(replace(job, payload=None), payload)
    want = ctx.executor._worker.run(job)
    assert not isinstance(got, str)  # not a failure's traceback
    assert torch.equal(got.update, want.update)
    assert got.metrics == want.metrics
    assert runner.ready()["device"] == "cpu" and runner.memory()["rss"] > 0


def test_cohort_runner_answers_a_shard_stacked_as_the_vmap_executor_runs_it():
    cfg = digits_config(strategy={"name": "scaffold"}, executor={"kind": "vmap", "device": "cpu"})
    run = build(load_config(cfg))
    ctx = run.ctx
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    jobs = [ctx.make_job(c, payload, version=0, job_id=j) for j, c in enumerate([5, 2, 7])]
    x, y = ctx.data.x_train.numpy().copy(), ctx.data.y_train.numpy().copy()
    x.flags.writeable = y.flags.writeable = False
    spec = replace(ctx.executor.spec, x_train=torch.empty(0), y_train=torch.empty(0))
    runner = CohortRunner(spec, x, y, threads=torch.get_num_threads(), gpu_fraction=0.0, options={})
    answer = runner.run([replace(j, payload=None) for j in jobs], [0, 0, 0], payload)
    assert answer.compute_s > 0 and isinstance(answer.contributions.updates, np.ndarray)  # one array per shard
    got, want = from_wire(answer.contributions), ctx.executor.run(jobs)
    assert got.jobs.tolist() == [0, 1, 2] and got.updates.shape == want.updates.shape
    torch.testing.assert_close(got.updates, want.updates)
    torch.testing.assert_close(got.state["c"], want.state["c"])
    assert got.metrics.keys() == want.metrics.keys()
    for column in (got.senders, got.jobs, got.versions, *got.metrics.values()):  # own, writable copies
        assert column.flags.writeable and column.flags.owndata
