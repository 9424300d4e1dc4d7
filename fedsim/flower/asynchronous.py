"""Asynchronous FL on a Flower deployment: async FedAvg, FedBuff and FedFix on the wall clock.

`concurrency` clients train at any time, each from the global model current when it was
dispatched. Replies are pulled as they arrive (Flower's Grid message API) and buffered;
the server aggregates

* every `buffer_size` arrivals (K = 1: asynchronous FedAvg; K > 1: FedBuff, Nguyen et al.,
  AISTATS 2022), and a client is re-dispatched as soon as its reply has been handled
  (replies pulled together are handled together, aggregation first), or
* every `window` wall-clock seconds over whoever arrived in the window (FedFix, Fraboni et
  al., JMLR 2023); finished clients wait for the boundary, every boundary is an
  aggregation (possibly empty) and a new model version.

Each update is the delta against the model its client received (``Msg.base``), applied
to the current model by the strategy's ``combine``, with staleness = server versions since
its dispatch (the strategy's staleness policy weights it). Aggregation weights come from
`fedsim.protocols.weighting`; for 'unbiased' the participation frequency f_i is estimated
as 1 / (staleness + 1): the share of aggregations one of the client's jobs spans (exact
for FedFix, whose client participates once every ceil(τ_i / Δt) windows).
A client's new persistent state is kept from the moment its result arrives (every arrival
is aggregated), so a client re-dispatched before the aggregation starts from it.
A re-dispatch picks uniformly (keyed by job id) among idle clients — the client just back
when every client is busy, as with concurrency = N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..clock import to_seconds, to_ticks
from ..comm import nbytes
from ..errors import ConfigError, FedsimError
from ..executors.base import JobResult
from ..protocols.base import ProtocolState, RunContext, uplink_bytes
from ..protocols.weighting import aggregation_weights, importance
from ..rng import numpy_rng
from ..strategy import CombineContext, Tensor
from .messages import TrainTask
from .protocol import FlowerProtocol, to_msgs


@dataclass
class Running:
    """A dispatched job: its client, and the model version and parameters it started from."""

    client: int
    version: int
    base: Tensor


@dataclass
class FlowerAsyncState(ProtocolState):
    """Server state, jobs in flight, the buffer of arrivals, and statistics."""

    server: Any = None
    version: int = 0
    accepted: dict[int, int] = field(default_factory=dict)  # client -> last job that arrived
    running: dict[int, Running] = field(default_factory=dict)  # job id -> job in flight
    buffer: list[tuple[JobResult, Running]] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)  # FedFix: clients back, waiting for the boundary
    next_window: int = 0  # FedFix: tick of the next boundary
    dropped: int = 0
    participants: int = 0
    train_loss: float | None = None
    staleness_seen: list[int] = field(default_factory=list)  # since the last evaluation


class FlowerAsync(FlowerProtocol):
    """See the module docstring."""

    def setup(self, ctx: RunContext) -> None:
        s = self.settings
        self.concurrency = s.concurrency or ctx.num_clients
        if self.concurrency > ctx.num_clients:
            raise ConfigError("run-config.concurrency", f"{self.concurrency} exceeds data.num_clients={ctx.num_clients}")
        self.window = to_ticks(s.window) if s.window else None
        self.p = importance(ctx.data.samples_per_client(), s.client_weights)
        super().setup(ctx)

    def init(self, ctx: RunContext) -> FlowerAsyncState:
        state = FlowerAsyncState(server=ctx.strategy.init(ctx.initial_params))
        if self.window is not None:
            state.next_window = self.now() + self.window
        self.dispatch(ctx, state, self.concurrency)
        return state

    def dispatch(self, ctx: RunContext, state: FlowerAsyncState, count: int) -> None:
        """Starts `count` new jobs on idle clients, from the current global model."""
        if count <= 0:
            return
        payload = ctx.strategy.publish(state.server)
        tasks = []
        for _ in range(count):
            busy = {r.client for r in state.running.values()} | set(state.waiting)
            idle = np.array(sorted(set(range(ctx.num_clients)) - busy))
            client = int(numpy_rng(ctx.seed, "dispatch", state.next_job).choice(idle))
            tasks.append(TrainTask(client, state.next_job, state.version, state.accepted.get(client, -1), payload))
            state.running[state.next_job] = Running(client, state.version, payload.params)
            state.next_job += 1
        self.link.dispatch(tasks, group=str(state.version))
        state.bytes_down += nbytes(payload) * len(tasks)
        for t in tasks:
            ctx.log(self.now(), "dispatch", client=t.client, version=state.version, job=t.job_id)

    def aggregate(self, ctx: RunContext, state: FlowerAsyncState) -> None:
        """Folds the buffer into the global model; the result is version + 1."""
        results = [r for r, _ in state.buffer]
        tau = [state.version - job.version for _, job in state.buffer]
        weights = aggregation_weights(self.settings.weighting, [r.client for r in results],
                                      [r.num_samples for r in results], self.p, [1.0 / (t + 1) for t in tau])
        msgs = to_msgs(results, weights, tau, [job.base for _, job in state.buffer], state)
        state.server = ctx.strategy.combine(state.server, msgs, CombineContext(ctx.num_clients, state.version,
                                                                                 to_seconds(state.time)))
        ctx.log(state.time, "aggregate", version=state.version + 1, clients=[r.client for r in results],
                jobs=[r.job_id for r in results], staleness=tau)
        state.staleness_seen += tau
        losses = [r.output.metrics["train_loss"] for r in results if "train_loss" in r.output.metrics]
        state.train_loss = float(np.mean(losses)) if losses else state.train_loss
        state.participants = len(results)
        state.buffer = []
        state.version += 1
        state.aggregations += 1
        state.rounds += 1

    def step(self, ctx: RunContext, state: FlowerAsyncState) -> FlowerAsyncState:
        state.time = self.now()
        if ctx.out_of_rounds(state) or state.time > ctx.budget_ticks():
            self.link.abandon(set(state.running))
            state.finished = True
            return state
        wait = to_seconds(state.next_window - state.time) if self.window else self.settings.reply_timeout
        results, lost = self.link.wait(self.deadline(max(wait, 0.0)))
        state.time = self.now()
        if not (results or lost or self.window):
            raise FedsimError(f"no reply came back within reply-timeout={wait:g} s")
        for r in results:
            job = state.running.pop(r.job_id)
            state.buffer.append((r, job))
            state.accepted[r.client] = r.job_id  # every arrival is aggregated: its node keeps the new state
            state.bytes_up += uplink_bytes(r)
            ctx.log(state.time, "arrival", client=r.client, version=state.version, job=r.job_id,
                    staleness=state.version - job.version)
            if self.window:
                state.waiting.append(r.client)
            elif len(state.buffer) >= self.settings.buffer_size and not ctx.out_of_rounds(state):
                self.aggregate(ctx, state)
        for d in lost:
            del state.running[d.job_id]
            state.dropped += 1
            ctx.log(state.time, "drop", client=d.client, version=state.version, job=d.job_id)
        if not self.window and not ctx.out_of_rounds(state):
            self.dispatch(ctx, state, len(results) + len(lost))  # arrivals of one pull count as simultaneous
        if self.window and state.time >= state.next_window:
            self.aggregate(ctx, state)
            state.waiting = []
            state.next_window += self.window
            if not ctx.out_of_rounds(state):
                self.dispatch(ctx, state, self.concurrency - len(state.running))
        state.finished = ctx.out_of_rounds(state)
        if state.finished:
            self.link.abandon(set(state.running))
        return state

    def eval_metrics(self, ctx: RunContext, state: FlowerAsyncState) -> dict[str, Any]:
        seen, state.staleness_seen = state.staleness_seen, []
        out: dict[str, Any] = {
            "train_loss": state.train_loss,
            "participants": state.participants,
            "dropped": state.dropped,
            "in_flight": len(state.running),
            "staleness_mean": float(np.mean(seen)) if seen else None,
            "staleness_max": max(seen) if seen else None,
        }
        if ctx.strategy.metrics is not None:
            out.update(ctx.strategy.metrics(state.server))
        return out
