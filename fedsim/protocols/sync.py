"""Synchronous rounds: sample clients, dispatch the global model, wait (or cut at a deadline).

Round r starts at virtual time t_r. The available clients are sampled (keyed by (seed, r)),
each job lasts its compute time plus transfer time, lost jobs disappear part-way, and the
server aggregates every result that arrived — all of them, or those before the deadline
t_r + deadline (the rest are counted as stragglers and their work is discarded). The round
ends when the last awaited job reports, or at the deadline. A round that would end after
run.time_budget is not performed. A round is planned (jobs run, arrivals timed) before it is
applied (`rounds.RoundProtocol`), so the runner knows when its model takes effect: with
`run.eval_every_time` the row at time t holds exactly the rounds that ended by t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping, Optional, Sequence

import numpy as np

from ..clock import to_seconds, to_ticks
from ..comm import nbytes
from ..config import Ge, Gt, OneOf, Range
from ..errors import ConfigError
from ..executors.base import Job, JobResult
from ..registry import PROTOCOLS
from ..rng import numpy_rng
from ..strategy import CombineContext, Msg, Payload, Tensor
from .base import Protocol, ProtocolState, RunContext, check_all_finite, uplink_bytes, wait_for_availability
from .rounds import FINISH, WAIT, RoundProtocol
from .weighting import IMPORTANCES, WEIGHTINGS, aggregation_weights, importance


@dataclass
class SyncState(ProtocolState):
    """Progress plus the server's strategy state and round statistics."""

    server: Any = None
    version: int = 0
    stragglers: int = 0
    dropped: int = 0
    participants: int = 0  # clients aggregated in the last round
    train_loss: float | None = None  # mean local loss of the last round's aggregated clients
    client_metrics: dict[str, float] = field(default_factory=dict)  # mean of each other client metric, same round

    def close_round(self, ctx: RunContext, accepted: Sequence[JobResult], jobs: int, stragglers: int,
                    dropped: int, bytes_down: int, end: int) -> None:
        """Books a round whose `accepted` results were aggregated: statistics, counters, clock."""
        losses = [r.output.metrics.get("train_loss") for r in accepted]
        losses = [x for x in losses if x is not None]
        self.train_loss = float(np.mean(losses)) if losses else None
        self.client_metrics = mean_client_metrics([r.output.metrics for r in accepted], skip=("train_loss",))
        self.participants = len(accepted)
        self.stragglers += stragglers
        self.dropped += dropped
        self.bytes_down += bytes_down
        self.bytes_up += int(sum(uplink_bytes(r) for r in accepted))
        self.next_job += jobs
        self.version += 1
        self.rounds += 1
        self.aggregations += 1
        self.time = end
        self.finished = ctx.out_of_rounds(self)


@dataclass
class SyncRound:
    """A planned round: its jobs, their results and when each arrives or is lost (ticks)."""

    t0: int
    available: int  # clients available at t0
    payload: Payload
    jobs: list[Job]
    results: dict[int, JobResult]  # client -> result, for jobs that were not lost
    on_time: list[tuple[int, int]]  # (arrival, client), in arrival order, aggregated
    late: list[tuple[int, int]]  # (arrival, client) after the deadline: stragglers
    losses: list[tuple[int, int]]  # (when lost, client)
    cut: int | None  # the deadline's tick
    end: int


class SyncProtocol(RoundProtocol):
    """See the module docstring."""

    requires = "server"
    drops_failed_jobs = True

    def __init__(self, clients_per_round: int | None, fraction: float | None, deadline: float | None,
                 weighting: str, client_weights: str):
        if clients_per_round is not None and fraction is not None:
            raise ConfigError("protocol", "set clients_per_round or fraction, not both")
        self.clients_per_round = clients_per_round
        self.fraction = fraction
        self.deadline = deadline
        self.weighting = weighting
        self.client_weights = client_weights

    def cohort_size(self, num_clients: int) -> int:
        """Returns how many clients a round samples (before availability caps it)."""
        if self.clients_per_round is not None:
            if self.clients_per_round > num_clients:
                raise ConfigError(
                    "protocol.clients_per_round", f"{self.clients_per_round} exceeds data.num_clients={num_clients}"
                )
            return self.clients_per_round
        if self.fraction is not None:
            return max(1, int(math.ceil(self.fraction * num_clients)))
        return num_clients

    def setup(self, ctx: RunContext) -> None:
        self.cohort_size(ctx.num_clients)
        self._p = importance(ctx.data.samples_per_client(), self.client_weights)

    def init(self, ctx: RunContext) -> SyncState:
        return SyncState(server=ctx.strategy.init(ctx.initial_params))

    def plan(self, ctx: RunContext, state: SyncState) -> SyncRound | str:
        """Samples the round's cohort, runs its jobs and times them; returns the round, or
        'finish' (out of rounds, or it would end after the budget) or 'wait' (no client available)."""
        if ctx.out_of_rounds(state):
            return FINISH
        t0 = state.time
        everyone = np.arange(ctx.num_clients)
        available = ctx.population.available(everyone, to_seconds(t0))
        if len(available) == 0:
            return WAIT
        m = min(self.cohort_size(ctx.num_clients), len(available))
        cohort = np.sort(numpy_rng(ctx.seed, "sample", state.rounds).choice(available, m, replace=False))
        payload = ctx.strategy.publish(state.server)
        down = nbytes(payload)
        job_ids = state.next_job + np.arange(m)
        jobs = ctx.make_jobs(cohort, payload, state.version, job_ids)
        lost, lost_at = ctx.population.drops(cohort, job_ids)
        results = {r.client: r for r in ctx.executor.run([j for j, gone in zip(jobs, lost) if not gone])}
        # a client whose code raised (executor.on_client_error='drop') is lost when its job would end
        failed = np.array([j.client in results and results[j.client].failed for j in jobs], dtype=bool)
        lost, lost_at = lost | failed, np.where(failed, 1.0, lost_at)
        results = {c: r for c, r in results.items() if not r.failed}
        ups = np.array([uplink_bytes(results[j.client]) if j.client in results else 0 for j in jobs])
        durations = ctx.population.job_ticks(cohort, [j.num_steps for j in jobs], np.full(m, down), ups, job_ids)

        cut = t0 + to_ticks(self.deadline) if self.deadline is not None else None
        arrivals, losses = [], []
        for job, dur, gone, frac in zip(jobs, durations, lost, lost_at):
            if gone:
                losses.append((t0 + int(round(frac * dur)), job.client))
            else:
                arrivals.append((t0 + dur, job.client))
        arrivals.sort()
        on_time = [(t, c) for t, c in arrivals if cut is None or t <= cut]
        late = [(t, c) for t, c in arrivals if cut is not None and t > cut]
        end = max([t for t, _ in arrivals] + [t for t, _ in losses] + [t0])
        if cut is not None:
            end = min(end, cut)
        if end > ctx.budget_ticks():
            return FINISH
        return SyncRound(t0, len(available), payload, jobs, results, on_time, late, losses, cut, end)

    def plan_end(self, plan: SyncRound | str) -> int | None:
        return plan.end if isinstance(plan, SyncRound) else None

    def apply(self, ctx: RunContext, state: SyncState, plan: SyncRound | str) -> SyncState:
        if plan == FINISH:
            state.finished = True
            return state
        if plan == WAIT:
            return wait_for_availability(ctx, state)
        t0, end, m, payload = plan.t0, plan.end, len(plan.jobs), plan.payload
        accepted = [plan.results[c] for _, c in plan.on_time]
        weights = aggregation_weights(
            self.weighting,
            [r.client for r in accepted],
            [r.num_samples for r in accepted],
            self._p,
            [m / plan.available] * len(accepted),
        )
        msgs = [
            Msg(r.client, r.output.update, w, 0, r.num_samples, r.num_steps, payload.params, r.output.extras)
            for r, w in zip(accepted, weights)
        ]
        check_all_finite(accepted, state.rounds, t0)
        state.server = ctx.strategy.combine(
            state.server, msgs, CombineContext(ctx.num_clients, state.version, to_seconds(end))
        )
        for r in accepted:
            ctx.store.put(r.client, r.output.state)

        if ctx.events is not None:
            for job in plan.jobs:
                ctx.log(t0, "dispatch", client=job.client, version=state.version, job=job.job_id)
            for t, c in plan.losses:
                ctx.log(t, "drop", client=c, version=state.version)
            for t, c in plan.on_time:
                ctx.log(t, "arrival", client=c, version=state.version, staleness=0)
            for t, c in plan.late:
                ctx.log(plan.cut, "straggler", client=c, version=state.version, would_arrive=to_seconds(t))
            ctx.log(end, "aggregate", version=state.version + 1, clients=[r.client for r in accepted])

        state.close_round(ctx, accepted, m, len(plan.late), len(plan.losses), nbytes(payload) * m, end)
        return state

    def eval_params(self, ctx: RunContext, state: SyncState) -> Tensor:
        return ctx.strategy.params(state.server)

    def eval_metrics(self, ctx: RunContext, state: SyncState) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train_loss": state.train_loss,
            "participants": state.participants,
            "stragglers": state.stragglers,
            "dropped": state.dropped,
        }
        out.update(state.client_metrics)
        if ctx.strategy.metrics is not None:
            out.update(ctx.strategy.metrics(state.server))
        return out


def mean_client_metrics(metrics: list[Mapping[str, Any]], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Returns {name: mean over the clients that reported it} for every scalar client metric not in `skip`."""
    seen: dict[str, list[float]] = {}
    for m in metrics:
        for k, v in m.items():
            if k not in skip and v is not None:
                seen.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in seen.items()}


@PROTOCOLS.register("sync")
def sync(
    clients_per_round: Annotated[Optional[int], Ge(1)] = None,
    fraction: Annotated[Optional[float], Range(0.0, 1.0, open_lo=True)] = None,
    deadline: Annotated[Optional[float], Gt(0)] = None,
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = "samples",
    client_weights: Annotated[str, OneOf(IMPORTANCES)] = "samples",
) -> Protocol:
    """Synchronous rounds with client sampling and an optional straggler deadline.

    Args:
        clients_per_round: Clients sampled per round (default: all available clients).
        fraction: Alternatively, the fraction of the population sampled per round.
        deadline: Round deadline in virtual seconds; later results are discarded as stragglers.
        weighting: Aggregation weights: 'samples' (n_i / Σ n_j), 'identical' (1/|S|),
            'unbiased' (p_i / f_i, f_i = sampling probability).
        client_weights: Client importance p_i in the objective, for 'unbiased': 'samples' or 'uniform'.
    """
    return SyncProtocol(clients_per_round, fraction, deadline, weighting, client_weights)
