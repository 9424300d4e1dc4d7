"""The vmap executor gives the serial executor's metrics under every kind of protocol.

One config each: synchronous rounds (SCAFFOLD: client state through the state store),
asynchronous (FedBuff-style buffer, jobs from different model versions), synchronous
decentralized (DFedSAM: two gradient passes per step, two gossip steps, nodes dropping out;
and 300 nodes, where gossip is a sparse CSR matmul) and asynchronous gossip learning (VCA
merges, jittered node clocks). Both executors run the same config; every metric of every
evaluation row must agree.

Tolerance (CPU, fp32): 1e-6 relative on every metric but accuracies (losses, node metrics,
consensus distance, bytes, times) and on the final model; an accuracy may differ by at most
one test sample (a logit that ties within rounding). Measured here: the decentralized and
gossip runs agree bit for bit, the synchronous and asynchronous ones to 1.4e-7 and 1.7e-7
(final model). The decentralized run is also checked on the CUDA-graph path, uncaptured
(reused buffers, cohorts padded), as the CPU runs it.
"""
from __future__ import annotations

import math

import pytest
import torch

from fedsim.executors.base import Job
from fedsim.executors.graphs import StaticCohortRunner
from fedsim.executors.vmap import VmapExecutor

from .conftest import digits_config, merge, run_config
from .test_async_gossip import gossip_config
from .test_decentralized import dec_config

RTOL = 1e-6


@pytest.fixture
def cohort_sizes(monkeypatch):
    """Records the size of every cohort the vmap executor runs as one vectorised call."""
    sizes: list[int] = []
    real = VmapExecutor._run_cohort

    def recording(self, jobs):
        sizes.append(len(jobs))
        return real(self, jobs)

    monkeypatch.setattr(VmapExecutor, "_run_cohort", recording)
    return sizes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_same_run(cfg: dict, sizes: list[int], **vmap: object):
    """Runs `cfg` with the serial and the vmap executor (settings `vmap`) and checks every row
    and the final model."""
    a = run_config(cfg)
    sizes.clear()
    b = run_config(merge(cfg, {"executor": {"kind": "vmap", "device": "cpu", **vmap}}))
    assert b.ctx.executor.unsupported is None and max(sizes) > 1  # vectorised, not a serial fallback
    one_sample = 1.0 / len(a.ctx.data.source.y_test)
    assert len(a.rows) == len(b.rows) > 1
    for ra, rb in zip(a.rows, b.rows):
        assert ra.keys() == rb.keys()
        for k, va in ra.items():
            vb = rb[k]
            if k == "wall_time" or va is None or isinstance(va, str):
                assert k == "wall_time" or vb == va, k
            elif "acc" in k:
                assert abs(vb - va) <= one_sample + 1e-12, (k, va, vb)
            else:
                assert math.isclose(vb, va, rel_tol=RTOL, abs_tol=1e-12), (k, va, vb)
    pa, pb = (r.protocol.eval_params(r.ctx, r.final_state) for r in (a, b))
    assert rel(pb, pa) <= RTOL
    return a, b


def test_sync_scaffold_equals_serial(cohort_sizes):
    cfg = digits_config(strategy={"name": "scaffold"}, run={"rounds": 4, "eval_every": 2, "torch_threads": 1})
    a, _ = assert_same_run(cfg, cohort_sizes)
    assert len(a.ctx.store) > 0  # client state went through the store


def test_async_buffered_equals_serial(cohort_sizes):
    cfg = digits_config(local={"momentum": 0.9}, run={"rounds": 8, "eval_every": 4, "torch_threads": 1})
    cfg["protocol"] = {"name": "async", "concurrency": 4, "buffer_size": 2}
    a, _ = assert_same_run(cfg, cohort_sizes)
    assert a.rows[-1]["aggregations"] == 8


@pytest.mark.parametrize("graphs", [False, True])
def test_decentralized_dfedsam_with_dropouts_equals_serial(cohort_sizes, monkeypatch, graphs):
    # graphs: the CUDA-graph path uncaptured (reused buffers, every cohort padded to its bucket)
    monkeypatch.setattr("fedsim.executors.vmap.EXACT_SIZES", 8 if not graphs else 0)
    replays: list[int] = []
    real = StaticCohortRunner.run
    monkeypatch.setattr(StaticCohortRunner, "run", lambda self, *a: replays.append(1) or real(self, *a))
    cfg = dec_config(strategy={"name": "dfedsam", "rho": 0.05}, protocol={"gossip_steps": 2}, topology={"name": "exponential"},
                     system={"dropout": {"name": "bernoulli", "p": 0.3}}, run={"rounds": 4, "eval_every": 2})
    a, b = assert_same_run(cfg, cohort_sizes, graphs=graphs)
    assert min(r["active_nodes"] for r in a.rows[1:]) < 8  # some nodes sat rounds out
    assert bool(replays) == graphs


def test_decentralized_sparse_gossip_equals_serial(cohort_sizes):
    # 300 nodes: the mixing matrix is a sparse CSR tensor (topologies.mixing.DENSE_UP_TO = 256)
    cfg = dec_config(data={"num_clients": 300}, topology={"name": "exponential"}, local={"steps": 1},
                     protocol={"eval_nodes": 4}, run={"rounds": 2, "eval_every": 1})
    assert_same_run(cfg, cohort_sizes)
    assert max(cohort_sizes) == 300  # every node's step in one call


def test_async_gossip_equals_serial(cohort_sizes):
    assert_same_run(gossip_config(run={"log_events": False}), cohort_sizes)


# ---- on a GPU (skipped where there is none, as in CI): the node stack lives on the device

ON_GPU = {"executor": {"kind": "vmap", "device": "cuda", "keep_on_device": True, "on_unsupported": "error"}}


def assert_close_on_gpu(cfg: dict):
    """Serial on the CPU against vmap on the GPU (fp32 there: other summation orders, so 1e-4)."""
    a, b = run_config(cfg), run_config(merge(cfg, ON_GPU))
    assert b.final_state.models.device.type == "cuda"
    assert rel(b.final_state.models.cpu(), a.final_state.models) <= 1e-4
    for ra, rb in zip(a.rows, b.rows):
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-4)
        assert rb["consensus_distance"] == pytest.approx(ra["consensus_distance"], rel=1e-3, abs=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("nodes,init", [(8, "shared"), (300, "independent")])
def test_decentralized_stack_and_sparse_gossip_on_gpu(nodes, init):
    cfg = dec_config(data={"num_clients": nodes}, topology={"name": "exponential"}, protocol={"init": init},
                     system={"dropout": {"name": "bernoulli", "p": 0.2}}, run={"rounds": 3, "eval_every": 1})
    assert_close_on_gpu(cfg)


@pytest.mark.cuda
def test_async_gossip_on_gpu():
    assert_close_on_gpu(gossip_config(run={"log_events": False}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_results_survive_the_next_replay_of_their_graph(device):
    # asynchronous protocols fetch a result after later cohorts ran: with the model on the GPU,
    # results must not be views of the captured graph's output buffers (on the CPU: the same
    # calls on the static-buffer path, uncaptured)
    from fedsim.config import load_config
    from fedsim.executors.base import Worker
    from fedsim.runner import build
    from fedsim.strategy import Payload

    from .test_vmap_executor import spec_of

    run = build(load_config(digits_config(local={"steps": 2}, executor={"kind": "vmap", "device": device,
                                                                        "keep_on_device": True, "graphs": True})))
    ex, ctx = run.ctx.executor, run.ctx
    gen = torch.Generator().manual_seed(0)
    payloads = [Payload((ctx.initial_params.cpu() + 0.1 * torch.randn(ctx.initial_params.shape, generator=gen))
                        .to(ctx.initial_params.device)) for _ in range(2)]
    first = [ctx.make_job(c, payloads[0], 0, 100 + c) for c in range(4)]
    second = [ctx.make_job(c, payloads[1], 1, 200 + c) for c in range(4)]
    got = [ex.run(first[:1])]  # runs alone: a cohort of its own
    for j in first[1:]:
        ex.submit(j)
    ex.result(first[1].job_id)  # the three others run as one cohort ...
    ex.run(second[1:])  # ... and the same captured graph replays for three new jobs
    got += [ex.result(j.job_id) for j in first[2:]]
    assert len(ex.runner) > 0  # the static-buffer path ran
    serial = Worker(spec_of(run), ctx.strategy)
    for job, r in zip([first[0], *first[2:]], got):
        cpu_job = Job(job.job_id, job.client, job.version, Payload(job.payload.params.cpu()), {}, job.indices,
                      job.num_samples)
        assert len(r) == 1 and int(r.jobs[0]) == job.job_id
        assert rel(r.updates[0].cpu(), serial.run(cpu_job).update) <= 1e-4
