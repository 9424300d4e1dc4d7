"""`fedsim sweep --vectorize`: runs that differ in their seed, local settings, server-side
settings or captured floats share one vmap call per round, and each run folder equals the
single run of its overrides (to float rounding); interrupted vectorised sweeps resume; runs
that cannot share calls run separately after one line saying why."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import sweep_vectorized
from fedsim.errors import Interrupted
from fedsim.config import load_config
from fedsim.sweep import is_finished, sweep
from fedsim.runner import build, drive
from fedsim.sweep_vectorized import run_together, why_not

from .conftest import quadratic_config, run_config
from .test_sweep import read_rows

SEEDS = [0, 1, 2]


def vmap_config(**run) -> dict:
    return quadratic_config(executor={"kind": "vmap", "device": "cpu"},
                            run={"rounds": 6, "eval_every": 2, "checkpoint_every": 1, **run})


def assert_rows_close(got: list[dict], want: list[dict], exact: bool = False) -> None:
    """The metrics rows are equal (floats to rounding, unless `exact`), wall times apart."""
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want):
        for k in g:
            if isinstance(w[k], float) and k != "wall_time" and not exact:
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (k, g, w)
            elif k != "wall_time":
                assert g[k] == w[k], (k, g, w)


def assert_single_run(folder: Path, cfg: dict, seed: int, exact: bool = False) -> torch.Tensor:
    """`folder` holds the rows and final model of a single run of `cfg` with `seed` (wall times
    apart), equal to float rounding or, with `exact`, bit for bit. Returns the final model."""
    assert is_finished(folder)
    single = run_config(cfg, None, overrides=(f"seed={seed}",))
    assert_rows_close(read_rows(folder / "metrics.jsonl"), json.loads(json.dumps(single.rows)), exact)
    model = single.protocol.eval_params(single.ctx, single.final_state)
    saved = torch.load(folder / "final_model.pt")
    if exact:
        assert torch.equal(saved, model)
    else:
        torch.testing.assert_close(saved, model, rtol=1e-5, atol=1e-6)
    return model


def assert_runs_equal_single_runs(cfg: dict, folder: Path, rows: list[dict], keys: list[str]) -> None:
    """Each run folder of a sweep holds the rows of the single run of its overrides (to rounding)."""
    for r in rows:
        single = run_config(cfg, None, overrides=(*[f"{k}={r[k]}" for k in keys], f"seed={r['seed']}"))
        assert_rows_close(read_rows(folder / r["run"] / "metrics.jsonl"), json.loads(json.dumps(single.rows)))


@pytest.fixture
def shared_calls(monkeypatch):
    """Records, for every shared vmap call, how many runs' jobs it held."""
    calls: list[int] = []
    original = sweep_vectorized.SharedVmap._run_shared

    def counted(self, batch):
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", counted)
    return calls


def test_vectorised_seeds_equal_separate_runs(tmp_path, shared_calls):
    cfg = vmap_config()
    lines: list[str] = []
    rows = sweep(cfg, [], SEEDS, tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert not any("separately" in line for line in lines), lines
    assert shared_calls == [3] * 6  # every round of the three runs was one call
    models = [assert_single_run(tmp_path / "s" / f"seed={seed}", cfg, seed) for seed in SEEDS]
    fresh = tmp_path / "fresh"  # the same files as a single run's folder, the same config.yaml
    run_config(cfg, fresh, overrides=("seed=2",))
    folder = tmp_path / "s" / "seed=2"
    assert (folder / "config.yaml").read_text() == (fresh / "config.yaml").read_text()
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == sorted(p.relative_to(fresh) for p in fresh.rglob("*"))
    assert not torch.equal(models[0], models[1])  # the seeds gave different runs


def test_an_interrupted_vectorised_sweep_resumes_to_the_single_runs(tmp_path, shared_calls, monkeypatch):
    cfg = vmap_config(rounds=8)
    original = sweep_vectorized.SharedVmap._run_shared  # counted by `shared_calls`

    def ctrl_c_midway(self, batch):  # Ctrl-C arrives during the 3rd round
        original(self, batch)
        if len(shared_calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            while self.stop_signal is None:  # the main thread's handler takes it
                time.sleep(0.01)

    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", ctrl_c_midway)
    with pytest.raises(Interrupted, match="sweep stopped by SIGINT"):
        sweep(cfg, [], SEEDS, tmp_path / "s", print_line=lambda _: None, vectorize=True)
    folders = [tmp_path / "s" / f"seed={s}" for s in SEEDS]
    assert not any(is_finished(f) for f in folders)
    assert all(list((f / "checkpoints").iterdir()) for f in folders)

    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", original)
    rows = sweep(cfg, [], SEEDS, tmp_path / "s", print_line=lambda _: None, vectorize=True)
    assert [(r["status"], r["how"]) for r in rows] == [("done", "resumed")] * 3
    assert set(shared_calls) == {3}  # resumed together too
    for seed, folder in zip(SEEDS, folders):
        assert_single_run(folder, cfg, seed)


@pytest.mark.parametrize("when", ["building", "stepping"])
def test_a_second_ctrl_c_stops_at_once_while_a_run_holds_the_baton(when):
    # run 0 spends 3 s in its own code (building its data, or its host work after a round)
    # while the user presses Ctrl-C twice: the second raises at once, and the runs' threads,
    # left in the background, end rather than wait for a server that is gone
    configs = [load_config(vmap_config(rounds=40, eval_every=1), [f"seed={s}"]) for s in SEEDS[:2]]
    sent: list[float] = []

    def ctrl_c_twice() -> None:
        for _ in range(2):
            time.sleep(0.3)
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

    def work(i, ex):
        if i == 0 and when == "building":
            threading.Thread(target=ctrl_c_twice, daemon=True).start()
            time.sleep(3)
        run = build(configs[i], executor=ex)
        step = run.protocol.step

        def slow_step(ctx, st):
            out = step(ctx, st)
            if i == 0 and when == "stepping" and out.rounds == 3:
                threading.Thread(target=ctrl_c_twice, daemon=True).start()
                time.sleep(3)
            return out

        run.protocol.step = slow_step
        return drive(run, None, progress=False)

    with pytest.raises(Interrupted, match="second interrupt"):
        run_together(configs, work)
    assert time.perf_counter() - sent[1] < 1.0
    deadline = time.perf_counter() + 10
    while any(t.name.startswith("fedsim-vectorised") for t in threading.enumerate()):
        assert time.perf_counter() < deadline, "the runs' threads still wait"
        time.sleep(0.05)


def test_runs_that_cannot_share_calls_run_separately_with_one_line(tmp_path, shared_calls):
    # seed s has 3 + s input features: the runs' models differ in size once built
    cfg = {"seed": 0, "data": {"name": "tests.tiny_sources:seeded_width", "num_clients": 3, "partition": "iid"},
           "model": {"name": "mlp", "hidden": [4]}, "local": {"lr": 0.05, "batch_size": 8, "steps": 2},
           "protocol": {"name": "sync"}, "executor": {"kind": "vmap", "device": "cpu"},
           "run": {"rounds": 3, "eval_every": 1, "progress": False}}
    lines: list[str] = []
    rows = sweep(cfg, [], [0, 1], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 2
    said = [line for line in lines if "separately" in line]
    assert said == ["sweep: running these 2 runs separately: their models differ in size (21 vs 25 parameters)"]
    assert shared_calls == []
    for seed in (0, 1):
        assert_single_run(tmp_path / "s" / f"seed={seed}", cfg, seed, exact=True)

    # what is known from the configs is said before anything runs
    quad = vmap_config()
    assert why_not([load_config(quad, [f"seed={s}"]) for s in (0, 1)]) is None
    serial = {**quad, "executor": {"kind": "serial"}}
    assert why_not([load_config(serial, [f"seed={s}"]) for s in (0, 1)]) == "executor.kind is 'serial', not 'vmap'"
    assert why_not([load_config(quad, ["seed=0"]), load_config(quad, ["seed=1", "model.name=mlp"])]) == (
        "the runs differ in model.name (runs that share calls may differ only in the seed, local.lr, "
        "local.momentum, local.weight_decay and the strategy, protocol, topology, system, run and data settings)")
    assert why_not([load_config(quad, ["local.batch_size=2"]), load_config(quad)]).startswith(
        "the runs differ in local.batch_size ")


@pytest.mark.parametrize("protocol", [{"name": "sync", "clients_per_round": 3},
                                      {"name": "async", "concurrency": 2}])
def test_hashed_orders_computed_for_the_shared_call_equal_single_runs(monkeypatch, shared_calls, protocol):
    # local.shuffle: hash — each run's orders are computed with the cohort (as a run's own vmap
    # executor does), keyed by the job's id in its run and shifted to its run's training rows
    # (the seeds' regression data differ, so the runs' rows do not start at 0)
    computed: list[int] = []
    cohort = sweep_vectorized._RunsOrders.cohort

    def counted(self, clients, job_ids, rows=None):
        computed.append(len(clients))
        return cohort(self, clients, job_ids, rows)

    monkeypatch.setattr(sweep_vectorized._RunsOrders, "cohort", counted)
    cfg = {"data": {"name": "tests.tiny_sources:regression", "num_clients": 6, "partition": "iid"},
           "model": {"name": "mlp", "hidden": [8]}, "strategy": {"name": "fedasync" if protocol["name"] == "async" else "fedavg"},
           "local": {"lr": 0.05, "batch_size": 4, "epochs": 1, "shuffle": "hash"}, "protocol": protocol,
           "executor": {"kind": "vmap", "device": "cpu"}, "run": {"rounds": 4, "eval_every": 2, "progress": False}}
    configs = [load_config(cfg, [f"seed={s}"]) for s in SEEDS]
    rows, _ = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert shared_calls and set(shared_calls) == {3} and computed
    for seed, got in zip(SEEDS, rows):
        assert_rows_close(got, run_config(cfg, None, overrides=(f"seed={seed}",)).rows)


def test_shared_hashed_orders_on_the_host_equal_the_cohorts():
    # a job whose order the host computes (a cohort re-run client by client) gets its cohort row
    from fedsim.data.hashed_order import DeviceOrders

    rng = np.random.default_rng(0)
    runs = [DeviceOrders([rng.permutation(n) for n in sizes], 4, 1, None, "shuffle", False, seed, torch.device("cpu"))
            for seed, sizes in ((0, (9, 12, 7)), (1, (12, 12, 5)))]
    orders = sweep_vectorized._RunsOrders(100, {0: 0, 1: 40})
    clients, own = np.array([0, 1, 2, 1, 0]), np.array([7, 8, 9, 3, 4])
    orders.rows([0, 0, 0, 1, 1], own, [runs[0]] * 3 + [runs[1]] * 2)
    shape = runs[0].shape(0)
    same = [i for i in range(5) if (runs[0] if i < 3 else runs[1]).shape(int(clients[i])) == shape]
    got = orders.cohort(clients[same], 100 + np.array(same), rows=len(same) + 1)
    assert (got[-1] == -1).all()  # the padding row
    for row, i in enumerate(same):
        want = orders.host(int(clients[i]), 100 + i)
        assert np.array_equal(got[row].numpy(), want)
        alone = (runs[0] if i < 3 else runs[1]).host(int(clients[i]), int(own[i]))
        assert np.array_equal(want, np.where(alone >= 0, alone + (0 if i < 3 else 40), -1))


def test_shared_calls_and_evaluations_run_in_the_calling_thread(monkeypatch):
    # the runs' threads may have a heap of small segments of their own (glibc arenas), where a
    # cohort's large blocks are mapped and unmapped call after call: the vectorised work runs in
    # the thread that called run_together, whose heap is the main one
    from fedsim.executors.vmap import VmapExecutor
    from fedsim.task import Task

    threads: dict[str, set[int]] = {"call": set(), "evaluate": set()}
    run_jobs, evaluate = VmapExecutor._run_jobs, Task.evaluate

    def recorded_run_jobs(self, jobs):
        threads["call"].add(threading.get_ident())
        return run_jobs(self, jobs)

    def recorded_evaluate(self, *args, **kwargs):
        threads["evaluate"].add(threading.get_ident())
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(VmapExecutor, "_run_jobs", recorded_run_jobs)
    monkeypatch.setattr(Task, "evaluate", recorded_evaluate)
    configs = [load_config(vmap_config(rounds=3, eval_every=1), [f"seed={s}"]) for s in SEEDS]
    rows, _ = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert all(len(r) == 4 for r in rows)  # rounds 0..3 evaluated
    assert threads == {"call": {threading.get_ident()}, "evaluate": {threading.get_ident()}}


def test_the_shared_calls_use_the_runs_torch_threads(monkeypatch):
    # torch's thread count is set per thread: the runs set run.torch_threads in their own threads
    # when they are built, and the thread that serves their calls sets it too (then restores it)
    from fedsim.executors.vmap import VmapExecutor

    seen: set[int] = set()
    run_jobs = VmapExecutor._run_jobs

    def recorded(self, jobs):
        seen.add(torch.get_num_threads())
        return run_jobs(self, jobs)

    monkeypatch.setattr(VmapExecutor, "_run_jobs", recorded)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    configs = [load_config(vmap_config(rounds=2, torch_threads=want), [f"seed={s}"]) for s in SEEDS]
    run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert seen == {want}
    assert torch.get_num_threads() == before


def test_asynchronous_runs_share_calls_too(shared_calls):
    # each run hands in the jobs it dispatched whenever it needs a result it does not have
    cfg = quadratic_config(executor={"kind": "vmap", "device": "cpu"}, strategy={"name": "fedasync"},
                           protocol={"name": "async", "concurrency": 4}, run={"rounds": 12, "eval_every": 4})
    configs = [load_config(cfg, [f"seed={s}"]) for s in SEEDS]
    assert why_not(configs) is None
    rows, stopped = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert stopped is None and shared_calls and set(shared_calls) == {3}
    for seed, got in zip(SEEDS, rows):
        assert_rows_close(got, run_config(cfg, None, overrides=(f"seed={seed}",)).rows)


EVAL_NOISE_NET = """
from torch import nn

from fedsim.registry import MODELS


class EvalNoiseNet(nn.Module):
    def __init__(self, inputs, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))

    def forward(self, x):  # dropout at evaluation only: the driver draws from torch's global generator
        return nn.functional.dropout(self.body(x), 0.5, training=not self.training)


@MODELS.register("eval_noise_net")
def eval_noise_net(ctx):
    \"\"\"A linear model whose evaluation drops half the outputs.\"\"\"
    import math

    return EvalNoiseNet(math.prod(ctx.input_shape), ctx.num_classes)
"""


def test_each_run_draws_from_its_own_generators(tmp_path, shared_calls):
    # the runs take turns, each with the global generator states it would have alone
    (tmp_path / "eval_noise_net.py").write_text(EVAL_NOISE_NET)
    cfg = {"data": {"name": "tests.tiny_sources:regression", "num_clients": 4, "partition": "iid"},
           "plugins": [str(tmp_path / "eval_noise_net.py")], "model": {"name": "eval_noise_net"},
           "local": {"lr": 0.05, "batch_size": 8, "steps": 2}, "protocol": {"name": "sync", "clients_per_round": 2},
           "executor": {"kind": "vmap", "device": "cpu"}, "run": {"rounds": 4, "eval_every": 1, "progress": False}}
    configs = [load_config(cfg, [f"seed={s}"]) for s in SEEDS]
    rows, _ = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert set(shared_calls) == {3}
    for seed, got in zip(SEEDS, rows):
        assert_rows_close(got, run_config(cfg, None, overrides=(f"seed={seed}",)).rows)


def test_runs_with_their_own_local_settings_share_calls_and_equal_single_runs(tmp_path, shared_calls):
    # local.lr, local.momentum and local.weight_decay travel with each job: one call per round
    # for all eight runs, each equal to its single run
    cfg = vmap_config()
    axes = [("local.lr", ["0.03", "0.05"]), ("local.momentum", ["0.0", "0.9"]), ("local.weight_decay", ["0.0", "0.01"])]
    lines: list[str] = []
    rows = sweep(cfg, axes, [0], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 8
    assert not any("separately" in line for line in lines), lines
    assert shared_calls == [8] * 6
    assert_runs_equal_single_runs(cfg, tmp_path / "s", rows, [k for k, _ in axes])
    assert len({round(r["test_loss"], 6) for r in rows}) == 8  # every setting changed the run


def test_server_side_settings_and_captured_numbers_share_calls_and_other_code_does_not(tmp_path, shared_calls):
    cfg = vmap_config()
    lines: list[str] = []
    rows = sweep(cfg, [("strategy.server_lr", ["0.5", "1.0"])], [0, 1], tmp_path / "a", print_line=lines.append,
                 vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 4 and shared_calls == [4] * 6, lines
    assert_runs_equal_single_runs(cfg, tmp_path / "a", rows, ["strategy.server_lr"])

    # FedProx's mu is captured by its local update: the runs share one template of it, each
    # job carrying its run's mu, and still equal their single runs
    shared_calls.clear()
    lines.clear()
    prox = vmap_config()
    prox["strategy"] = {"name": "fedprox", "mu": 0.01}
    rows = sweep(prox, [("strategy.mu", ["0.0", "2.0"])], [0, 1], tmp_path / "b", print_line=lines.append,
                 vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 4 and shared_calls == [4] * 6, lines
    assert_runs_equal_single_runs(prox, tmp_path / "b", rows, ["strategy.mu"])
    assert rows[0]["test_loss"] != rows[2]["test_loss"]  # mu changed the runs

    # SCAFFOLD's option picks other code: no template covers both
    scaffold = [load_config(vmap_config(), ["strategy.name=scaffold", f"strategy.option={o}"]) for o in ("I", "II")]
    assert why_not(scaffold) == "their strategies' local updates differ in more than the numbers they capture"


BRANCHY = """
from fedsim.blocks import fl_server, sgd, weighted_sum
from fedsim.local import sgd_steps
from fedsim.registry import STRATEGIES
from fedsim.strategy import ClientOutput


@STRATEGIES.register("branchy")
def branchy(scale: float = 1.0):
    \"\"\"FedAvg whose clients double their update when scale > 1.5 (Python control flow).\"\"\"
    def local(payload, state, batches, grad_fn, hp):
        y, loss = sgd_steps(payload.params, batches, grad_fn, hp)
        u = payload.params - y
        if scale > 1.5:
            u = u * 2
        return ClientOutput(u, {}, {}, {"train_loss": loss})

    return fl_server(local, reduce=weighted_sum(), transform=sgd(1.0))
"""


@pytest.mark.parametrize("strategy, key, values, named", [
    # a plugin's captured float in an `if`
    ({"name": "branchy"}, "strategy.scale", ["1.0", "2.0"], "captured scale"),
    # FedNova computes ‖a‖₁ from the momentum in Python (`if not momentum`)
    ({"name": "fednova"}, "local.momentum", ["0.0", "0.5"], "local.momentum"),
])
def test_own_values_that_do_not_vectorise_send_the_runs_apart(tmp_path, shared_calls, strategy, key, values, named):
    (tmp_path / "branchy.py").write_text(BRANCHY)
    cfg = vmap_config()
    cfg.update(plugins=[str(tmp_path / "branchy.py")], strategy=strategy)
    lines: list[str] = []
    rows = sweep(cfg, [(key, values)], [0], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 2
    said = [line for line in lines if "separately" in line]
    assert len(said) == 1 and said[0].startswith(
        f"sweep: running these 2 runs separately: the values that differ between them ({named}) do not vectorise"), lines
    assert_runs_equal_single_runs(cfg, tmp_path / "s", rows, [key])


def test_groups_put_each_run_with_the_first_it_can_share_with():
    quad = vmap_config()
    serial = {**quad, "executor": {"kind": "serial"}}
    configs = [load_config(quad, ["local.lr=0.03"]), load_config(quad, ["model.name=mlp"]),
               load_config(quad, ["local.lr=0.05", "seed=3"]), load_config(serial)]
    shared, alone = sweep_vectorized.groups(configs)
    assert shared == [[0, 2]]
    assert alone[1].startswith("the runs differ in model.name")
    assert alone[3].startswith("the runs differ in executor.")


def test_a_job_s_own_zero_momentum_and_weight_decay_change_nothing():
    # a job's own settings are tensors, for which sgd_step always applies both terms: with
    # zeros that gives the scalar path's result bit for bit
    from fedsim.local import sgd_steps
    from fedsim.strategy import Batches, LocalHP, split_job_hp

    g = torch.Generator().manual_seed(0)
    x0, target = torch.randn(7, generator=g), torch.randn(4, 7, generator=g)
    batches = Batches(target, torch.zeros(4), torch.ones(4))

    def grad_fn(y, batch):
        return 2 * (y - batch.x), ((y - batch.x) ** 2).sum()

    scalar = sgd_steps(x0, batches, grad_fn, LocalHP(0.1))
    hp, extras = split_job_hp(LocalHP(0.5), {"c": x0, "hp.lr": torch.tensor(0.1), "hp.momentum": torch.tensor(0.0),
                                             "hp.weight_decay": torch.tensor(0.0)})
    assert set(extras) == {"c"} and isinstance(hp.momentum, torch.Tensor)
    tensor = sgd_steps(x0, batches, grad_fn, hp)
    assert torch.equal(scalar[0], tensor[0]) and torch.equal(scalar[1], tensor[1])
    with pytest.raises(ValueError, match="hp.beta"):
        split_job_hp(LocalHP(0.1), {"hp.beta": torch.tensor(0.9)})


def test_the_serial_worker_runs_a_job_with_its_own_settings():
    # the vmap executor's fallback re-runs jobs on the serial worker: it must read them too
    from dataclasses import replace

    from fedsim.executors.base import Worker
    from fedsim.strategy import Payload

    run = build(load_config(quadratic_config(), ["local.lr=0.05"]))
    job = run.ctx.make_job(0, run.ctx.strategy.publish(run.ctx.strategy.init(run.ctx.initial_params)), 0, 0)
    worker = run.ctx.executor._worker
    slow = worker.run(replace(job, payload=Payload(job.payload.params, {"hp.lr": torch.tensor(0.01, dtype=job.payload.params.dtype)})))
    spec = replace(worker.spec, hp=replace(worker.spec.hp, lr=0.01))
    want = Worker(spec).run(job)
    assert torch.equal(slow.update, want.update)
    assert not torch.equal(worker.run(job).update, want.update)


def test_gossip_and_asynchronous_runs_with_their_own_settings_share_calls(shared_calls):
    # a decentralized round hands in every node's step, an asynchronous run its dispatched
    # jobs: each job still carries its run's learning rate (and the topology is the protocol's)
    gossip = quadratic_config(executor={"kind": "vmap", "device": "cpu"}, protocol={"name": "decentralized"},
                              strategy={"name": "dfedavg"}, topology={"name": "ring"},
                              run={"rounds": 4, "eval_every": 2})
    over = [["local.lr=0.03"], ["local.lr=0.06", "topology.name=complete"], ["local.lr=0.06", "seed=1"]]
    configs = [load_config(gossip, o) for o in over]
    assert why_not(configs) is None
    rows, _ = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert shared_calls and set(shared_calls) == {3}
    for o, got in zip(over, rows):
        assert_rows_close(got, run_config(gossip, None, overrides=tuple(o)).rows)

    shared_calls.clear()
    fedasync = quadratic_config(executor={"kind": "vmap", "device": "cpu"}, strategy={"name": "fedasync"},
                                protocol={"name": "async", "concurrency": 4}, run={"rounds": 8, "eval_every": 4})
    over = [["local.lr=0.03"], ["local.lr=0.06", "local.momentum=0.5"]]
    configs = [load_config(fedasync, o) for o in over]
    rows, _ = run_together(configs, lambda i, ex: drive(build(configs[i], executor=ex), None, progress=False))
    assert shared_calls and set(shared_calls) == {2}
    for o, got in zip(over, rows):
        assert_rows_close(got, run_config(fedasync, None, overrides=tuple(o)).rows)



def test_runs_whose_local_update_does_not_vectorise_run_separately_with_their_own_keys(tmp_path, shared_calls):
    # this compressor seeds a torch.Generator from each job's own key: inside the shared call its
    # jobs would run client by client under the shared call's job ids and the first run's seed;
    # the runs go separately
    cfg = vmap_config()
    cfg["strategy"] = {"name": "compressed", "compressor": {"name": "tests.test_compression:keyed_mask"},
                       "feedback": "ef21"}
    lines: list[str] = []
    rows = sweep(cfg, [], [0, 1], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 2
    said = [line for line in lines if "separately" in line]
    assert len(said) == 1 and "their local update does not vectorise" in said[0], lines
    for seed in (0, 1):
        assert_single_run(tmp_path / "s" / f"seed={seed}", cfg, seed, exact=True)


def test_keyed_compressor_draws_in_a_shared_call_are_each_run_s_own(tmp_path, shared_calls):
    # rand-k and QSGD draw from each job's key: the shared call gives every row its own run's
    # seed and job id, so the runs vectorise and still equal their single runs bit for bit
    cfg = vmap_config()
    cfg["strategy"] = {"name": "compressed", "compressor": {"name": "randk", "ratio": 0.3}, "feedback": "ef21"}
    lines: list[str] = []
    rows = sweep(cfg, [], [0, 1], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done"] * 2
    assert 2 in shared_calls and not [line for line in lines if "separately" in line], lines
    for seed in (0, 1):
        assert_single_run(tmp_path / "s" / f"seed={seed}", cfg, seed, exact=True)
