"""The vmap executor gives the serial executor's results (fp32, ≤ 1e-6 relative on the CPU),
for shared and per-job payloads, client state and extras, uneven client sizes, chunking,
padding, and reports strategies that cannot be vectorised."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.errors import ClientJobError, ConfigError, FedsimError
from fedsim.executors.base import Job, Worker, WorkerSpec
from fedsim.executors.cohort import block_size, group, stack
from fedsim.executors.graphs import StaticCohortRunner, bucket
from fedsim.executors.precision import keep_freed_memory, precision
from fedsim.executors.vmap import VmapExecutor
from fedsim.local import sgd_steps
from fedsim.runner import build
from fedsim.merge import mix
from fedsim.state_store import ClientStateStore
from fedsim.strategy import ClientOutput, GossipStrategy, LocalHP, Payload

from .conftest import digits_config, quadratic_config, run_config

RTOL = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def spec_of(run) -> WorkerSpec:
    """The WorkerSpec the runner gave its executor."""
    c = run.config
    hp = LocalHP(c.local.lr, c.local.momentum, c.local.weight_decay)
    return WorkerSpec(run.ctx.task, run.ctx.data.x_train, run.ctx.data.y_train, c.strategy, hp, c.seed)


def started(run, strategy=None, **kwargs) -> VmapExecutor:
    ex = VmapExecutor(device="cpu", **kwargs)
    ex.start(spec_of(run), strategy or run.ctx.strategy)
    return ex


def final_params(run):
    return run.protocol.eval_params(run.ctx, run.final_state)


def compare_runs(cfg: dict, rtol: float = RTOL, **vmap_kwargs):
    """Runs `cfg` on the serial and the vmap executor; asserts equal models and metrics to `rtol`."""
    a = run_config(cfg)
    b = run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu", **vmap_kwargs}})
    assert rel(final_params(b), final_params(a)) <= rtol
    for ra, rb in zip(a.rows, b.rows):
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=rtol)
        if ra["test_accuracy"] is not None:
            assert abs(rb["test_accuracy"] - ra["test_accuracy"]) <= 1.0 / 300  # ≤ 1 test sample flips
        if ra.get("train_loss") is not None:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=rtol)
    return a, b


def test_sync_digits_equals_serial_with_uneven_clients():
    # Dirichlet-per-class split: clients differ in size, so step counts and padding differ
    cfg = digits_config(local={"momentum": 0.9, "weight_decay": 1e-3})
    a, b = compare_runs(cfg)
    ks = {len(np.asarray(a.ctx.data.client_train[c])) // 16 for c in range(8)}
    assert len(ks) > 1  # several cohorts of different K were formed
    assert a.rows[-1]["test_accuracy"] > 0.3


def test_sync_quadratic_float64_equals_serial():
    compare_runs(quadratic_config(run={"rounds": 20, "eval_every": 5}))


def test_chunking_and_static_padding_equal_serial(monkeypatch):
    cfg = digits_config(run={"rounds": 3, "eval_every": 3})
    compare_runs(cfg, max_chunk=3)
    monkeypatch.setattr("fedsim.executors.vmap.EXACT_SIZES", 0)  # pad every cohort to its bucket
    compare_runs(cfg, graphs=True)  # CPU: padded cohorts on reused buffers (the CUDA-graph path, uncaptured)


@pytest.mark.parametrize("option", ["I", "II"])
def test_scaffold_on_padded_static_buffers_equals_serial(monkeypatch, option):
    # per-client state (SCAFFOLD's c_i) stacked into the reused buffers, with padding rows
    cfg = digits_config(strategy={"name": "scaffold", "option": option}, run={"rounds": 3, "eval_every": 3})
    monkeypatch.setattr("fedsim.executors.vmap.EXACT_SIZES", 0)
    compare_runs(cfg, graphs=True)


def test_cnn_with_unfold_convs_equals_serial():
    cfg = digits_config(model={"name": "cnn", "channels": [4, 8], "hidden": 16}, run={"rounds": 2, "eval_every": 2})
    compare_runs(cfg, conv="unfold")
    compare_runs(cfg, conv="native")


@pytest.mark.slow
def test_compiled_cohorts_equal_serial_to_rounding():
    # torch.compile (Inductor, C++ on the CPU) of the cohort function: ~10-20 s to compile here
    compare_runs(quadratic_config(run={"rounds": 5, "eval_every": 5}), compile=True)


def test_a_failing_compile_warns_and_runs_eagerly(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    cfg = quadratic_config(run={"rounds": 3, "eval_every": 3})
    with pytest.warns(RuntimeWarning, match="torch.compile of the cohort failed .*no C\\+\\+ compiler"):
        a, b = compare_runs(cfg, compile=True)
    assert b.ctx.executor.compile is False and b.ctx.executor.unsupported is None


def test_compiled_cohorts_are_padded_to_a_few_sizes(monkeypatch):
    # an asynchronous run forms cohorts of many sizes; each compiled shape costs a compile
    compiled = []

    def counting(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", counting)
    cfg = quadratic_config(protocol={"name": "async", "concurrency": 10, "buffer_size": 3},
                           system={"compute": {"name": "lognormal", "mean": 1.0, "sigma": 1.0}},
                           run={"rounds": 60, "eval_every": 60})
    a, b = compare_runs(cfg, compile=True)
    sizes = b.ctx.executor._sizes  # EXACT_SIZES exact cohort sizes, then bucketed ones
    assert len(sizes) <= 9 and len(compiled) <= 2 * len(sizes)  # × payload shared or stacked


# ---- executor-level tests with per-job payloads, client state and extras (async / gossip shapes)

def _stateful_strategy() -> GossipStrategy:
    """A SCAFFOLD-shaped client: corrected direction g − c_i + c, new c_i, extras {'dc'}."""

    def local(payload, state, batches, grad_fn, hp):
        c, ci = payload.extras["c"], state["c"]

        def direction(y, batch, grad_fn, k):
            g, loss = grad_fn(y, batch)
            return g - ci + c, loss

        y, loss = sgd_steps(payload.params, batches, grad_fn, hp, direction)
        new_ci = ci - c + (payload.params - y) / (hp.lr * max(batches.num_steps, 1))
        return ClientOutput(payload.params - y, {"c": new_ci}, {"dc": new_ci - ci}, {"train_loss": loss, "k": 3})

    return GossipStrategy(local, mix, client_state=lambda p: {"c": torch.zeros_like(p)})  # executors read only local


def _jobs(run, strategy, shared_payload: bool, n: int = 8):
    ctx = run.ctx
    gen = torch.Generator().manual_seed(0)
    base = ctx.initial_params
    shared = Payload(base, {"c": 0.01 * torch.randn(base.shape, generator=gen)})
    jobs = []
    for i in range(n):
        client = i % ctx.num_clients
        if shared_payload:
            payload = shared
        else:  # every job from its own model version, as in asynchronous runs
            payload = Payload(base + 0.01 * torch.randn(base.shape, generator=gen), {"c": shared.extras["c"]})
        state = {"c": 0.01 * torch.randn(base.shape, generator=gen)}
        job = ctx.make_job(client, payload, i, i)
        jobs.append(Job(job.job_id, client, i, payload, state, job.indices, job.num_samples))
    return jobs


def assert_equal_serial(got, jobs, worker) -> None:
    """Each row of `got` (the stateful strategy's cohort) equals the serial worker's run of its job."""
    for i, job in enumerate(jobs):
        want = worker.run(job)
        assert rel(got.updates[i], want.update) <= RTOL
        assert rel(got.state["c"][i], want.state["c"]) <= RTOL
        assert rel(got.extras["dc"][i], want.extras["dc"]) <= RTOL
        assert got.metrics["train_loss"][i] == pytest.approx(want.metrics["train_loss"], rel=RTOL)
        assert got.metrics["k"][i] == 3.0


@pytest.mark.parametrize("shared_payload", [True, False])
def test_stacked_payloads_state_and_extras_equal_serial(shared_payload):
    run = build(load_config(digits_config()))
    strategy = _stateful_strategy()
    worker = Worker(spec_of(run), strategy)
    ex = started(run, strategy)
    jobs = _jobs(run, strategy, shared_payload)
    assert len(group(jobs)) > 1  # uneven clients: several step counts
    got = ex.run(jobs)
    assert got.jobs.tolist() == [j.job_id for j in jobs] and got.senders.tolist() == [j.client for j in jobs]
    assert got.num_steps.tolist() == [j.num_steps for j in jobs]
    assert_equal_serial(got, jobs, worker)
    # a client's stored state must not pin the whole cohort's stack in memory
    store = ClientStateStore()
    store.put(0, {"c": got.state["c"][1]})
    assert store.get(0)["c"].untyped_storage().nbytes() == got.state["c"][1].numel() * 4


@pytest.mark.parametrize("graphs", [False, True])  # True: the static-buffer path (captured on CUDA)
def test_payloads_in_blocks_are_broadcast_within_each_block(graphs):
    # a vectorised sweep's call: consecutive jobs share their run's global model, the runs' models
    # differ; the cohort stacks one model per block and equals the serial executor
    run = build(load_config(digits_config(data={"partition": "iid"})))
    strategy = _stateful_strategy()
    worker = Worker(spec_of(run), strategy)
    ex = started(run, strategy, graphs=graphs)
    gen = torch.Generator().manual_seed(1)
    base = run.ctx.initial_params
    jobs = []
    for block in range(3):
        payload = Payload(base + 0.05 * torch.randn(base.shape, generator=gen), {"c": 0.01 * torch.randn(base.shape, generator=gen)})
        for i in range(4):
            job = run.ctx.make_job(block + i, payload, len(jobs), len(jobs))
            jobs.append(Job(job.job_id, job.client, len(jobs), payload, {"c": 0.01 * torch.randn(base.shape, generator=gen)},
                            job.indices, job.num_samples))
    assert len(group(jobs)) == 1
    st = stack(jobs, torch.device("cpu"))
    assert st.params_block == 4 and st.params.shape == (3, base.numel())
    assert_equal_serial(ex.run(jobs), jobs, worker)


@pytest.mark.parametrize("layout,block", [("aabb", 2), ("aaabbbccc", 3), ("aab", None), ("abab", None),
                                          ("aaaa", None), ("ab", None), ("aabbaa", 2), ("aabbb", None)])
def test_block_size(layout, block):
    objects = {c: object() for c in set(layout)}
    assert block_size([objects[c] for c in layout]) == block


def test_results_in_any_order_and_discard():
    run = build(load_config(digits_config()))
    ex = started(run)
    payload = Payload(run.ctx.initial_params)
    jobs = [run.ctx.make_job(c, payload, 0, c) for c in range(6)]
    for j in jobs:
        ex.submit(j)
    ex.discard(2)
    got = [int(ex.result(j).jobs[0]) for j in (5, 0, 3)]
    assert got == [5, 0, 3]
    assert set(ex._done) == {1, 4}  # computed with the others, kept until asked for
    with pytest.raises(KeyError):
        ex.result(2)


def test_out_of_memory_splits_the_cohort(monkeypatch):
    run = build(load_config(digits_config()))
    ex = started(run)
    real = ex._run_cohort
    sizes = []

    def limited(jobs):
        sizes.append(len(jobs))
        if len(jobs) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(jobs)

    monkeypatch.setattr(ex, "_run_cohort", limited)
    payload = Payload(run.ctx.initial_params)
    jobs = [run.ctx.make_job(0, payload, 0, j) for j in range(8)]  # one cohort: same client, 8 jobs
    got = ex.run(jobs)
    assert sizes == [8, 4, 2, 2, 2, 2] and ex.chunk_cap == 2  # halved until it fit, then kept
    worker = Worker(spec_of(run), run.ctx.strategy)
    for job, u in zip(jobs, got.updates):
        assert rel(u, worker.run(job).update) <= RTOL


# ---- strategies that cannot be vectorised

def _branchy_strategy(fail_always: bool = False) -> GossipStrategy:
    def local(payload, state, batches, grad_fn, hp):
        y = payload.params
        for k in range(batches.num_steps):
            g, loss = grad_fn(y, batches[k])
            if fail_always:
                raise ValueError("user bug in local update")
            if float(g.norm()) > 1e9:  # data-dependent Python control flow: not vmappable
                g = g / g.norm()
            y = y - hp.lr * g
        return ClientOutput(payload.params - y, {}, {}, {})

    return GossipStrategy(local, mix)


def test_unvectorisable_strategy_falls_back_with_a_warning():
    run = build(load_config(digits_config()))
    strategy = _branchy_strategy()
    ex = started(run, strategy)
    payload = Payload(run.ctx.initial_params)
    jobs = [run.ctx.make_job(c, payload, 0, c) for c in range(8)]
    with pytest.warns(RuntimeWarning, match="cannot be vectorised with torch.func.vmap"):
        got = ex.run(jobs)
    assert ex.unsupported is not None and "control flow" in ex.unsupported
    serial = Worker(spec_of(run), strategy)
    for job, u in zip(jobs, got.updates):
        assert torch.equal(u, serial.run(job).update)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later jobs run serially without noise
        ex.run([run.ctx.make_job(0, payload, 1, 100)])


def test_unvectorisable_strategy_can_be_an_error():
    run = build(load_config(digits_config()))
    ex = started(run, _branchy_strategy(), on_unsupported="error")
    payload = Payload(run.ctx.initial_params)
    with pytest.raises(FedsimError, match="cannot be vectorised.*executor.kind: serial"):
        ex.run([run.ctx.make_job(c, payload, 0, c) for c in range(3)])


def test_a_gpu_library_failure_is_not_blamed_on_the_strategy(monkeypatch):
    run = build(load_config(digits_config()))
    ex = started(run)
    payload = Payload(run.ctx.initial_params)

    def cudnn_fails(jobs):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")

    monkeypatch.setattr(ex, "_run_cohort", cudnn_fails)
    with pytest.warns(RuntimeWarning, match="failed in a GPU library .*cuDNN error.*executor.conv") as seen:
        got = ex.run([run.ctx.make_job(c, payload, 0, c) for c in range(3)])
    assert not any("control flow" in str(w.message) for w in seen)
    assert len(got) == 3 and ex.unsupported is not None  # ran client by client


def test_user_error_is_reported_like_serial():
    run = build(load_config(digits_config()))
    ex = started(run, _branchy_strategy(fail_always=True))
    payload = Payload(run.ctx.initial_params)
    with pytest.raises(ClientJobError, match="user bug in local update"):
        ex.run([run.ctx.make_job(c, payload, 0, c) for c in range(3)])


@pytest.fixture
def dropout_config(tmp_path, monkeypatch):
    """A digits config whose model (a plugin module in tmp_path) has a Dropout layer."""
    (tmp_path / "drop_model.py").write_text(
        "import torch\n"
        "def net(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Dropout(0.3),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(32, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = digits_config(run={"rounds": 3, "eval_every": 3})
    cfg["model"] = {"name": "drop_model:net"}
    return cfg


def test_dropout_needs_randomness_knob(dropout_config):
    cfg = dropout_config
    with pytest.warns(RuntimeWarning, match="randomness"):
        run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu"}})
    vm = {**cfg, "executor": {"kind": "vmap", "device": "cpu", "randomness": "different"}}
    a, b = run_config(vm), run_config(vm)
    assert torch.equal(final_params(a), final_params(b))  # keyed per cohort: reproducible


# ---- knobs and helpers

def test_cuda_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="executor.device"):
        run_config(digits_config(executor={"kind": "vmap", "device": "cuda"}))


def test_bf16_autocast_runs_close_to_fp32():
    cfg = digits_config(run={"rounds": 2, "eval_every": 2})
    a = run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu"}})
    b = run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu", "precision": "bf16"}})
    assert 0 < rel(final_params(b), final_params(a)) < 0.05


def test_precision_context_restores_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with precision("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32
    with precision("fp32", "cpu"):
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17, 50, 1000)] == [1, 2, 4, 8, 16, 32, 64, 1008]


def test_keep_freed_memory_on_linux():
    import sys

    assert keep_freed_memory() is sys.platform.startswith("linux")


# ---- CUDA (run on a GPU machine; skipped where there is none, as in CI). Each runs the vmap
# executor with on_unsupported: error, so a cohort that fails to vectorise fails the test
# instead of falling back to the serial path, which would hide the failure.

ON_CUDA = {"kind": "vmap", "device": "cuda", "on_unsupported": "error"}


@pytest.mark.cuda
@pytest.mark.parametrize("graphs,keep_on_device", [(False, False), (True, False), (True, True)])
def test_cuda_equals_serial(graphs, keep_on_device):
    cfg = digits_config(local={"momentum": 0.9})
    a = run_config(cfg)
    b = run_config({**cfg, "executor": {**ON_CUDA, "graphs": graphs,
                                        "keep_on_device": keep_on_device}})
    assert final_params(b).device.type == ("cuda" if keep_on_device else "cpu")
    assert rel(final_params(b).cpu(), final_params(a)) <= 1e-4  # fp32 on a GPU: other summation orders
    assert b.rows[-1]["test_loss"] == pytest.approx(a.rows[-1]["test_loss"], rel=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("option", ["I", "II"])
def test_cuda_graphed_scaffold_equals_serial(option, monkeypatch):
    captured: list[int] = []
    real = StaticCohortRunner._make
    monkeypatch.setattr(StaticCohortRunner, "_make", lambda self, *a: captured.append(1) or real(self, *a))
    cfg = digits_config(strategy={"name": "scaffold", "option": option}, run={"rounds": 4, "eval_every": 2})
    a = run_config(cfg)
    b = run_config({**cfg, "executor": {**ON_CUDA, "graphs": True, "keep_on_device": True}})
    assert captured  # cohorts ran as captured graphs (the run's end drops them)
    assert rel(final_params(b).cpu(), final_params(a)) <= 1e-4
    assert b.rows[-1]["test_loss"] == pytest.approx(a.rows[-1]["test_loss"], rel=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("protocol", [{"name": "sync", "clients_per_round": 4},
                                      {"name": "async", "buffer_size": 2, "concurrency": 4}])
def test_cuda_stored_and_fresh_client_rows_stack_on_the_device(protocol):
    # with keep_on_device a first-time client's state and its server-side memory start from the
    # model on the GPU, while the state store keeps returning clients' rows on the CPU: cohorts
    # (SCAFFOLD's c_i) and the server's memory (EF21's h_i) stack both kinds
    cfg = digits_config(strategy={"name": "compressed", "inner": "scaffold", "compressor": "identity", "feedback": "ef21"},
                        run={"rounds": 4, "eval_every": 2})
    cfg["protocol"] = protocol
    a = run_config(cfg)
    b = run_config({**cfg, "executor": {**ON_CUDA, "keep_on_device": True}})
    assert sorted(b.ctx.memory.clients()) == sorted(a.ctx.memory.clients()) and len(a.ctx.memory) > 4  # returning clients
    assert rel(final_params(b).cpu(), final_params(a)) <= 1e-4


@pytest.mark.cuda
def test_cuda_compiled_graphed_cohorts_equal_serial():
    cfg = digits_config(local={"momentum": 0.9}, run={"rounds": 3, "eval_every": 3})
    a = run_config(cfg)
    b = run_config({**cfg, "executor": {**ON_CUDA, "compile": True, "keep_on_device": True}})
    assert b.ctx.executor.compile is True  # it compiled (no eager fallback)
    assert rel(final_params(b).cpu(), final_params(a)) <= 1e-4


@pytest.mark.cuda
def test_cuda_unfold_cnn_equals_serial():
    cfg = digits_config(model={"name": "cnn", "channels": [4, 8], "hidden": 16}, run={"rounds": 2, "eval_every": 2})
    a = run_config(cfg)
    b = run_config({**cfg, "executor": {**ON_CUDA, "conv": "unfold"}})
    assert rel(final_params(b).cpu(), final_params(a)) <= 1e-4


@pytest.mark.cuda
def test_cuda_graphs_with_dropout_are_reproducible(dropout_config):
    cfg = {**dropout_config, "executor": {**ON_CUDA, "randomness": "different", "graphs": True}}
    a, b = run_config(cfg), run_config(cfg)
    # reproducible run to run (measured on an H200: the draws differ from the eager path's)
    assert torch.equal(final_params(a), final_params(b))
