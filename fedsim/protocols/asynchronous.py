"""Asynchronous FL on the virtual clock: async FedAvg, FedBuff, FedBuff-c and FedFix as knobs.

The schedule (`async_engine`) decides when jobs start, arrive and are aggregated; this
protocol does the learning at those moments. Each job starts from the global model version
current at its dispatch; its update u_i = x^{ρ_i} − y_i is a delta against the model the
client *received*, and the strategy adds it to the *current* model, with each contribution's
columns filled here: weight d_i (`weighting`), staleness n − ρ_i, and base x^{ρ_i}. Sent models are kept
only while an in-flight job or a buffered update still refers to them.

Schemes (Fraboni et al., JMLR 2023, arXiv 2206.10189; the schedules
were checked against their code, FL/clients_schedule.py and FL/server.py):

=================  ===========================================================
async FedAvg       ``{name: async}`` (aggregate every arrival, restart at once)
FedBuff            ``{name: async, buffer_size: K, concurrency: C}`` + strategy
                   ``staleness: {name: polynomial, a: 0.5}`` (Nguyen et al. 2022;
                   the exponent ½ is recalled, not checked against their paper)
FedBuff-c          ``{name: async, buffer_size: c, redispatch: aggregation}``
                   (Fraboni's semi-synchronous variant: the c earliest wait for t)
FedFix-Δt          ``{name: async, window: Δt}`` (redispatch defaults to the window)
=================  ===========================================================

At the time budget T the run stops (``at_budget: stop``): a buffer still short of K
updates is not aggregated. Fraboni et al.'s FedBuff loop instead completes it — it runs
while the earliest return is ≤ T, so its last aggregation can land after T:
``at_budget: complete`` does the same (one aggregation past T at most).

Weights: ``identical`` d_i = 1/|S| (Async_identical: 1; FedBuff-c: 1/c); ``unbiased``
d_i = p_i / f_i, Fraboni's "weight" variants, with f_i = client i's updates per aggregation
measured on a learning-free run of the same schedule (their rule for FedBuff; for Async and
FedFix it tends to their closed forms (1/τ_i)/Σ_j 1/τ_j and 1/⌈τ_i/Δt⌉ as the horizon grows,
and equals them when the horizon is a whole number of the schedule's periods).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Iterable, Optional

import numpy as np

from ..clock import to_seconds, to_ticks
from ..comm import nbytes
from ..config import Ge, Gt, OneOf
from ..errors import ConfigError
from ..contributions import Contributions
from ..registry import PROTOCOLS
from ..state_types import checkpointable
from ..strategy import CombineContext, Payload, Tensor
from .async_engine import AT_AGGREGATION, IMMEDIATE, Engine, Flight, Hooks, Rules, ScheduleState, Trace, Update
from .base import Protocol, RunContext
from .weighting import IMPORTANCES, WEIGHTINGS, aggregation_weight_array, count_updates, importance, online_frequencies

STOP, COMPLETE = "stop", "complete"  # at_budget: what the time budget does to a partly filled buffer


@checkpointable
@dataclass
class AsyncState(ScheduleState):
    """The schedule plus the server's strategy state, the sent models and the results in flight."""

    server: Any = None
    models: dict[int, Payload] = field(default_factory=dict)  # version -> payload still referenced
    refs: dict[int, int] = field(default_factory=dict)  # version -> jobs/updates referring to it
    results: dict[int, Contributions] = field(default_factory=dict)  # job -> its row, not yet aggregated
    # job -> the client state a still-computing job was dispatched with, kept once the store's
    # entry for its client has changed since (to resubmit the job exactly after a resume)
    dispatch_states: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    # accumulators since the last evaluation
    staleness_seen: list[int] = field(default_factory=list)
    losses_seen: list[float] = field(default_factory=list)
    participation: np.ndarray | None = None  # updates aggregated per client (weighting 'unbiased_online')


class AsyncProtocol(Protocol, Hooks):
    """See the module docstring."""

    strategy_kind = "server"
    drops_failed_jobs = True

    def __init__(self, concurrency: int | None, buffer_size: int, window: float | None, redispatch: str,
                 max_staleness: int | None, weighting: str, client_weights: str, at_budget: str = STOP):
        if window is not None and buffer_size != 1:
            raise ConfigError("protocol.buffer_size", "a window aggregates whatever arrived; leave buffer_size at 1")
        if window is not None and at_budget != STOP:
            raise ConfigError("protocol.at_budget", "a window aggregates at its boundaries, never a buffer "
                              "left at the budget; leave at_budget at 'stop'")
        self.concurrency = concurrency
        self.buffer_size = buffer_size
        self.window = window
        self.redispatch = redispatch if redispatch != "auto" else (AT_AGGREGATION if window else IMMEDIATE)
        self.clock_runs_alone = window is not None and self.redispatch == AT_AGGREGATION  # windows tick on
        self.max_staleness = max_staleness
        self.weighting = weighting
        self.client_weights = client_weights
        self.at_budget = at_budget

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: RunContext) -> None:
        n = ctx.num_clients
        conc = n if self.concurrency is None else self.concurrency
        if conc > n:
            raise ConfigError("protocol.concurrency", f"{conc} exceeds data.num_clients={n}")
        if self.window is None and self.redispatch == AT_AGGREGATION and self.buffer_size > conc:
            raise ConfigError(
                "protocol.buffer_size",
                f"{self.buffer_size} > concurrency {conc}: with redispatch=aggregation the buffer never fills",
            )
        window = to_ticks(self.window) if self.window is not None else None
        if window is not None and window <= 0:
            raise ConfigError("protocol.window", f"{self.window} s is below the clock's resolution (1 ns)")
        rules = Rules(conc, self.buffer_size, window, self.redispatch, self.max_staleness,
                      complete_buffer=self.at_budget == COMPLETE)
        self.ctx = ctx
        if self.weighting == "unbiased" and not ctx.clock.virtual:
            raise ConfigError("protocol.weighting", "'unbiased' traces the schedule in advance, which only a "
                              "simulation can; use 'unbiased_online' (frequencies estimated from the arrivals)")
        self.engine = Engine(rules, ctx.clock, n, ctx.seed, ctx.budget_ticks(), ctx.run.rounds, ctx.executor)
        self._p = importance(ctx.data.samples_per_client(), self.client_weights)
        self._f = self.schedule_frequencies(ctx) if self.weighting == "unbiased" else None
        self._submitted = False  # in-flight jobs are resubmitted (`resume`) before the first step after a restore
        self._sized: Payload | None = None  # the payload whose wire size `_size` is (the current version's)
        self._size = 0

    def schedule_frequencies(self, ctx: RunContext) -> np.ndarray:
        """Returns f_i from a learning-free run of this schedule over the run's horizon
        (uplinks assumed as large as the model)."""
        payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
        size = nbytes(payload)
        trace = Trace(lambda c, j: ctx.make_job(c, payload, 0, j).num_steps, size, nbytes(payload.params))
        self.engine.run(ScheduleState(), trace)
        return trace.frequencies(ctx.num_clients)

    def init(self, ctx: RunContext) -> AsyncState:
        st = AsyncState(server=ctx.strategy.init(ctx.initial_params))
        if self.weighting == "unbiased_online":
            st.participation = np.zeros(ctx.num_clients, dtype=np.int64)
        self._submitted = True
        return self.engine.start(st, self)

    # ------------------------------------------------------------------ stepping
    def step(self, ctx: RunContext, state: AsyncState) -> AsyncState:
        if not self._submitted:
            self.resume(ctx, state)
        self.engine.step(state, self)
        if state.finished:
            for f in state.flights.values():
                if f.job not in state.results:
                    ctx.executor.discard(f.job)
        return state

    def resume(self, ctx: RunContext, state: AsyncState) -> None:
        """Resubmits the jobs still computing in a restored state (the executor knows none of
        them): those with a pending `done` event, each with the client state it started from."""
        computing = sorted(ev.data["job"] for ev in state.queue.pending("done"))
        for job in computing:
            f = state.flights[job]
            j = ctx.make_job(f.client, state.models[f.version], f.version, f.job)
            if job in state.dispatch_states:
                j = replace(j, state=state.dispatch_states[job])
            ctx.executor.submit(j)
        self._submitted = True

    def next_time(self, ctx: RunContext, state: AsyncState) -> int | None:
        return self.engine.next_time(state)

    def eval_params(self, ctx: RunContext, state: AsyncState) -> Tensor:
        return ctx.strategy.params(state.server)

    def eval_metrics(self, ctx: RunContext, state: AsyncState) -> dict[str, Any]:
        seen, losses = state.staleness_seen, state.losses_seen
        out: dict[str, Any] = {
            "updates": len(seen),  # updates aggregated since the last evaluation
            "staleness_mean": float(np.mean(seen)) if seen else None,
            "staleness_max": int(max(seen)) if seen else None,
            "train_loss": float(np.mean(losses)) if losses else None,
            "in_flight": len(state.flights),
            "dropped": state.dropped,
            "discarded": state.discarded,
        }
        state.staleness_seen, state.losses_seen = [], []
        if ctx.strategy.metrics is not None:
            out.update(ctx.strategy.metrics(state.server))
        return out

    # ------------------------------------------------------------------ hooks (learning)
    def dispatch(self, st: AsyncState, client: int, job: int, submit: bool) -> tuple[int, int]:
        v = st.version
        if v not in st.models:
            st.models[v] = self.ctx.strategy.publish(st.server)
        st.refs[v] = st.refs.get(v, 0) + 1
        payload = st.models[v]
        j = self.ctx.make_job(client, payload, v, job)
        # a stateless strategy's jobs start from no state: no buffered one to continue from
        pending = self._buffered(st, client) if self.ctx.strategy.client_state is not None else None
        if pending is not None:  # the client continues from its last accepted job, not yet stored
            j = replace(j, state=pending[1])
            st.dispatch_states[job] = pending[1]  # a resume resubmits the job with it
            self.ctx.executor.keep_states(np.array([pending[0]]), np.array([client]))
        if submit:
            self.ctx.executor.submit(j)
        if self._sized is not payload:  # every job of a version downloads the same payload
            self._sized, self._size = payload, nbytes(payload)
        st.bytes_down += self._size
        return j.num_steps, self._size

    def finish(self, st: AsyncState, flight: Flight) -> int | None:
        result = self.ctx.executor.result(flight.job)
        st.dispatch_states.pop(flight.job, None)
        if not len(result):  # its code failed (executor.on_client_error='drop')
            return None
        st.results[flight.job] = result
        up = result.row_uplink_bytes(0)
        st.bytes_up += up
        return up

    def aggregate(self, st: AsyncState, updates: list[Update], time: int) -> None:
        ctx = self.ctx
        got = Contributions.concat([st.results.pop(u.job) for u in updates])
        clients = got.senders
        freq = None
        if self._f is not None:  # a client the learning-free schedule never aggregated: count it once
            floor = 1.0 / max(st.aggregations + 1, 1)
            freq = np.where(self._f[clients] > 0, self._f[clients], floor)
        elif st.participation is not None:
            freq = online_frequencies(st.participation, st.aggregations + st.empty_windows, clients)
            count_updates(st.participation, clients)
        staleness = np.array([u.staleness for u in updates], dtype=np.int64)
        bases = tuple(st.models[u.version].params for u in updates)
        weights = aggregation_weight_array(self.weighting, clients, got.num_samples, self._p, freq)
        got = got.replace(weights=weights, staleness=staleness, bases=bases[0] if len(set(map(id, bases))) == 1 else bases)
        got, memory = ctx.receive(got, st.rounds, time)
        st.server = ctx.strategy.combine(st.server, got, CombineContext(ctx.num_clients, st.version, to_seconds(time)))
        # jobs still computing, by client: their stored states are kept before accepting changes them
        # (a stateless strategy stores none, so there is nothing to keep)
        if ctx.strategy.client_state is not None:
            computing: dict[int, list[int]] = {}
            for f in st.flights.values():
                computing.setdefault(f.client, []).append(f.job)
            for client in dict.fromkeys(clients.tolist()):
                self._keep_dispatch_states(st, client, computing.get(client, ()))
        # all rows at once: a client with several updates in the buffer keeps its last row's
        # state, as accepting them one by one would
        ctx.accept(got, memory)
        for u in updates:
            self.release(st, u.job, u.version)
        st.staleness_seen.extend(staleness.tolist())
        losses = got.metrics.get("train_loss")
        if losses is not None:
            losses = np.asarray(losses, dtype=np.float64)
            st.losses_seen.extend(losses[~np.isnan(losses)].tolist())

    @staticmethod
    def _buffered(st: AsyncState, client: int) -> tuple[int, dict[str, Tensor]] | None:
        """(job, client state) of `client`'s newest result waiting in the buffer (accepted, to be
        aggregated), or None. A client redispatched before its last update is aggregated must
        start from that update's state: the server will apply the update, and a strategy with
        a server-side copy of client state (EF21's h_i) must see the same sequence."""
        for u in reversed(st.buffer):
            if u.client == client and u.job in st.results:
                row = st.results[u.job]
                return u.job, {k: v[0] for k, v in row.state.items()}
        return None

    def _keep_dispatch_states(self, st: AsyncState, client: int, jobs: Iterable[int]) -> None:
        """Before `client`'s stored state changes: remembers it for its jobs `jobs` (in flight)
        that are still computing."""
        for job in jobs:
            if job not in st.results and job not in st.dispatch_states:
                st.dispatch_states[job] = self.ctx.client_state(client)

    def release(self, st: AsyncState, job: int, version: int) -> None:
        st.results.pop(job, None)
        st.dispatch_states.pop(job, None)
        st.refs[version] -= 1
        if st.refs[version] == 0:
            del st.refs[version]
            del st.models[version]

    def log(self, time: int, kind: str, **fields: Any) -> None:
        self.ctx.log(time, kind, **fields)


@PROTOCOLS.register("async")
def asynchronous(
    concurrency: Annotated[Optional[int], Ge(1)] = None,
    buffer_size: Annotated[int, Ge(1)] = 1,
    window: Annotated[Optional[float], Gt(0)] = None,
    redispatch: Annotated[str, OneOf(("auto", IMMEDIATE, AT_AGGREGATION))] = "auto",
    max_staleness: Annotated[Optional[int], Ge(0)] = None,
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = "identical",
    client_weights: Annotated[str, OneOf(IMPORTANCES)] = "samples",
    at_budget: Annotated[str, OneOf((STOP, COMPLETE))] = STOP,
) -> Protocol:
    """Asynchronous server: jobs in flight on the virtual clock, aggregation per K arrivals or per window.

    Args:
        concurrency: Jobs kept in flight (default: every client, as Fraboni et al.); a freed
            slot goes to an idle available client (a keyed uniform draw if several).
        buffer_size: Aggregate when this many updates have arrived (1: async FedAvg; K: FedBuff).
        window: Aggregate instead at every multiple of this many virtual seconds, over whatever
            arrived (FedFix-Δt); an empty window is no aggregation (no new version, not counted
            toward run.rounds).
        redispatch: When a client that reported gets a new job: 'immediate', 'aggregation'
            (waits for the next aggregation, i.e. the window boundary or the full buffer),
            or 'auto' (aggregation with a window, immediate otherwise).
        max_staleness: Discard updates more than this many versions stale (None: keep all).
        weighting: Aggregation weights d_i: 'identical' (1/|S|), 'samples' (n_i/Σn_j),
            'unbiased' (p_i/f_i, Fraboni et al.'s "weight" variants, f_i from a learning-free
            trace of the schedule: simulation only) or 'unbiased_online' (p_i/f_i with f_i
            estimated from the arrivals so far: simulation and deployment).
        client_weights: Client importance p_i in the objective, for 'unbiased': 'samples' or 'uniform'.
        at_budget: What run.time_budget does to a buffer that holds updates but is not full:
            'stop' (the run ends at the budget; they are never aggregated) or 'complete' (the
            schedule runs on until that buffer is full and aggregates it once, after the
            budget, as Fraboni et al.'s FedBuff loop). Not with a window.
    """
    return AsyncProtocol(concurrency, buffer_size, window, redispatch, max_staleness, weighting, client_weights,
                         at_budget)
