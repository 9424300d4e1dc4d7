"""A new protocol, a new executor and a new kind of per-node state, each one plugin file.

Each plugin below is written against the engine's contracts only (docs/architecture.md,
"Extension points") and loaded through the config's ``plugins:``; nothing in fedsim is edited.

* protocol ``round_robin``: synchronous rounds that serve clients in a fixed rotation instead
  of a keyed sample — written with the clock, the executor and the strategy's combine exactly
  as the built-in ``sync`` protocol is, so it runs on every executor (and would run on a
  Flower deployment, which swaps only the clock and the executor);
* executor ``reversed``: runs every job of a call in reverse order (any order is allowed:
  the contract is that results come back as one row per job, in the jobs' order);
* a gossip strategy with persistent per-node state (a momentum buffer kept across rounds):
  the decentralized protocols keep it per node in the client-state store, as the server
  protocols do for SCAFFOLD's c_i.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from .conftest import merge, quadratic_config, run_config

PROTOCOL = '''
"""Round robin: round r trains clients r·m, …, r·m + m − 1 (mod N), then aggregates them all."""
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.clock import to_seconds
from fedsim.comm import nbytes
from fedsim.protocols.base import Protocol, ProtocolState
from fedsim.protocols.weighting import aggregation_weight_array
from fedsim.registry import PROTOCOLS
from fedsim.strategy import CombineContext


@dataclass
class RoundRobinState(ProtocolState):
    server: Any = None
    version: int = 0


class RoundRobin(Protocol):
    strategy_kind = "server"

    def __init__(self, clients_per_round):
        self.m = clients_per_round

    def init(self, ctx):
        return RoundRobinState(server=ctx.strategy.init(ctx.initial_params))

    def step(self, ctx, state):
        if ctx.out_of_rounds(state):
            state.finished = True
            return state
        t0 = ctx.clock.start(state.time)
        clients = np.sort((state.rounds * self.m + np.arange(self.m)) % ctx.num_clients)
        payload = ctx.strategy.publish(state.server)
        jobs = ctx.make_jobs(clients, payload, state.version, state.next_job + np.arange(self.m))
        out = ctx.clock.run_round(ctx.executor, jobs, t0, None, nbytes(payload))
        got = out.results
        got = got.replace(weights=aggregation_weight_array("samples", got.senders, got.num_samples),
                          staleness=np.zeros(len(got), dtype=np.int64), bases=payload.params)
        got, memory = ctx.receive(got, state.rounds, t0)
        state.server = ctx.strategy.combine(state.server, got, CombineContext(ctx.num_clients, state.version,
                                                                            to_seconds(out.end)))
        ctx.accept(got, memory)
        ctx.log(out.end, "aggregate", clients=got.senders.tolist())
        state.version += 1
        state.rounds += 1
        state.aggregations += 1
        state.next_job += self.m
        state.time = out.end
        state.finished = ctx.out_of_rounds(state)
        return state

    def eval_params(self, ctx, state):
        return ctx.strategy.params(state.server)


@PROTOCOLS.register("round_robin")
def round_robin(clients_per_round: int = 2) -> Protocol:
    """Clients take turns, clients_per_round at a time.

    Args:
        clients_per_round: Clients trained (and aggregated) per round.
    """
    return RoundRobin(clients_per_round)
'''

EXECUTOR = '''
"""An executor that runs a call's jobs last to first (and returns their rows in the jobs' order)."""
from fedsim.contributions import Contributions
from fedsim.executors.base import Executor, Worker
from fedsim.registry import EXECUTORS


class Reversed(Executor):
    def start(self, spec, strategy=None):
        self.worker, self.pending, self.ran = Worker(spec, strategy), {}, []

    def submit(self, job):
        self.pending[job.job_id] = job

    def result(self, job_id):
        job = self.pending.pop(job_id)
        self.ran.append(job_id)
        return self.contribution(job, self.worker.attempt(job))

    def run(self, jobs):
        for job in jobs:
            self.submit(job)
        rows = {j.job_id: self.result(j.job_id) for j in reversed(list(jobs))}
        return Contributions.concat([rows[j.job_id] for j in jobs])


@EXECUTORS.register("reversed")
def reversed_executor() -> Executor:
    """Runs jobs last to first."""
    return Reversed()
'''

STATEFUL_GOSSIP = '''
"""DFedAvg whose nodes keep their local momentum buffer across rounds (per-node state)."""
import torch

from fedsim.local import sgd_steps
from fedsim.merge import mix
from fedsim.registry import STRATEGIES
from fedsim.strategy import ClientOutput, GossipStrategy


@STRATEGIES.register("sticky_momentum")
def sticky_momentum(beta: float = 0.5) -> GossipStrategy:
    """Local steps along v ← βv + g, with v kept from one round to the next.

    Args:
        beta: Momentum β.
    """

    def local(payload, state, batches, grad_fn, hp):
        v = [state["v"]]

        def direction(y, batch, grad_fn, k):
            g, loss = grad_fn(y, batch)
            v[0] = beta * v[0] + g
            return v[0], loss

        y, loss = sgd_steps(payload.params, batches, grad_fn, hp, direction)
        return ClientOutput(y, {"v": v[0]}, {}, {"train_loss": loss})

    return GossipStrategy(local, mix, client_state=lambda p: {"v": torch.zeros_like(p)})
'''


def _plugin(tmp_path, name: str, code: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return str(path)


def test_a_plugin_protocol_runs_on_every_executor(tmp_path):
    cfg = quadratic_config(plugins=[_plugin(tmp_path, "rr", PROTOCOL)], protocol={"name": "round_robin"},
                           strategy={"name": "scaffold"}, run={"rounds": 30, "eval_every": 10, "log_events": True})
    serial = run_config(cfg, tmp_path / "serial")
    vm = run_config(merge(cfg, {"executor": {"kind": "vmap", "device": "cpu"}}))
    served = [__import__("json").loads(x)["clients"] for x in (tmp_path / "serial" / "events.jsonl").read_text().splitlines()]
    assert served[:6] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [0, 1]]
    assert serial.rows[-1]["dist_to_opt"] < 0.5 * serial.rows[0]["dist_to_opt"]
    assert len(serial.ctx.store) == 10  # SCAFFOLD's c_i, kept per client by the plugin protocol's ctx.accept
    torch.testing.assert_close(vm.protocol.eval_params(vm.ctx, vm.final_state),
                               serial.protocol.eval_params(serial.ctx, serial.final_state), rtol=1e-6, atol=1e-9)


def test_a_plugin_executor_gives_the_serial_results(tmp_path):
    cfg = quadratic_config(plugins=[_plugin(tmp_path, "rev", EXECUTOR)], strategy={"name": "scaffold"},
                           protocol={"name": "sync", "clients_per_round": 4}, run={"rounds": 3, "eval_every": 3})
    plugin = run_config(merge(cfg, {"executor": {"kind": "reversed"}}))
    serial = run_config(cfg)
    assert plugin.ctx.executor.ran[:4] == [3, 2, 1, 0]  # it really ran them backwards
    assert torch.equal(plugin.protocol.eval_params(plugin.ctx, plugin.final_state),
                       serial.protocol.eval_params(serial.ctx, serial.final_state))


@pytest.mark.parametrize("protocol", [{"name": "decentralized"}, {"name": "async_gossip", "init": "shared"}])
def test_per_node_state_persists_under_the_gossip_protocols(tmp_path, protocol):
    cfg = quadratic_config(plugins=[_plugin(tmp_path, "sticky", STATEFUL_GOSSIP)], protocol=protocol,
                           strategy={"name": "sticky_momentum"}, topology={"name": "ring"},
                           run={"rounds": 3, "eval_every": 3, "checkpoint_every": 1})
    run = run_config(cfg, tmp_path / "run")
    kept = {i: run.ctx.store.get(i) for i in range(10)}
    assert all(v is not None and bool(v["v"].abs().sum() > 0) for v in kept.values())
    zero = run_config(merge(cfg, {"strategy": {"beta": 0.0}}))  # β = 0: no momentum, nothing to keep
    assert not torch.equal(run.final_state.models, zero.final_state.models)
    assert np.isfinite(run.rows[-1]["test_loss"])
