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
from typing import Annotated, Any, Optional

import numpy as np

from ..clock import to_seconds
from ..comm import nbytes
from ..config import Ge, OneOf, Range
from ..errors import ConfigError
from ..contributions import Contributions
from ..executors.job_batch import JobBatch
from ..registry import PROTOCOLS
from ..rng import numpy_rng
from ..state_types import checkpointable
from ..strategy import CombineContext, Payload, Tensor
from .base import Protocol, ProtocolState, RunContext, wait_for_availability
from .rounds import FINISH, WAIT, RoundProtocol
from .weighting import IMPORTANCES, WEIGHTINGS, aggregation_weight_array, count_updates, importance, online_frequencies


@checkpointable
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
    participation: np.ndarray | None = None  # rounds each client was aggregated in (weighting 'unbiased_online')

    def close_round(self, ctx: RunContext, aggregated: Contributions, jobs: int, stragglers: int,
                    dropped: int, bytes_down: int, bytes_up: int, end: int, residue: float = 0.0) -> None:
        """Books a round that aggregated `aggregated` and ended at tick `end` (`residue` ticks
        before its exact end): statistics, counters, clock."""
        means = aggregated.metric_means()
        self.train_loss, self.client_metrics = means.pop("train_loss", None), means
        self.participants = len(aggregated)
        self.stragglers += stragglers
        self.dropped += dropped
        self.bytes_down += bytes_down
        self.bytes_up += bytes_up
        self.next_job += jobs
        self.version += 1
        self.rounds += 1
        self.aggregations += 1
        self.time, self.residue = end, residue
        self.finished = ctx.out_of_rounds(self)


@dataclass
class SyncRound:
    """A planned round: its jobs, their results, and when each arrives or is lost (ticks)."""

    t0: int
    available: int  # clients available at t0
    payload: Payload
    jobs: JobBatch
    aggregated: Contributions  # of the jobs that arrived by the deadline, in arrival order
    on_time_at: np.ndarray  # their arrival ticks
    late: list[tuple[int, int]]  # (arrival, client) after the deadline: stragglers
    losses: list[tuple[int, int]]  # (when lost, client)
    cut: int | None  # the deadline's tick
    end: int
    end_residue: float  # exact end − end, in ticks


class SyncProtocol(RoundProtocol):
    """See the module docstring."""

    strategy_kind = "server"
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
        self._everyone = np.arange(ctx.num_clients)
        self._everyone.flags.writeable = False

    def init(self, ctx: RunContext) -> SyncState:
        state = SyncState(server=ctx.strategy.init(ctx.initial_params))
        if self.weighting == "unbiased_online":
            state.participation = np.zeros(ctx.num_clients, dtype=np.int64)
        return state

    def plan(self, ctx: RunContext, state: SyncState) -> SyncRound | str:
        """Samples the round's cohort, runs its jobs and times them; returns the round, or
        'finish' (out of rounds, or it would end after the budget) or 'wait' (no client available)."""
        if ctx.out_of_rounds(state):
            return FINISH
        t0 = ctx.clock.start(state.time)
        available = ctx.clock.available(self._everyone, t0)
        if len(available) == 0:
            return WAIT
        m = min(self.cohort_size(ctx.num_clients), len(available))
        cohort = np.sort(numpy_rng(ctx.seed, "sample", state.rounds).choice(available, m, replace=False))
        payload = ctx.strategy.publish(state.server)
        jobs = ctx.make_jobs(cohort, payload, state.version, state.next_job + np.arange(m))
        residue = state.residue if t0 == state.time else 0.0  # a round that waited starts on a tick
        out = ctx.clock.run_round(ctx.executor, jobs, t0, self.deadline, nbytes(payload), residue)
        if out.end > ctx.budget_ticks():
            return FINISH
        return SyncRound(t0, len(available), payload, jobs, out.results, out.arrivals, out.late, out.losses, out.cut,
                         out.end, out.end_residue)

    def plan_end(self, plan: SyncRound | str) -> int | None:
        return plan.end if isinstance(plan, SyncRound) else None

    def apply(self, ctx: RunContext, state: SyncState, plan: SyncRound | str) -> SyncState:
        if plan == FINISH:
            state.finished = True
            return state
        if plan == WAIT:
            return wait_for_availability(ctx, state)
        t0, end, m, payload, jobs = plan.t0, plan.end, len(plan.jobs), plan.payload, plan.jobs
        got = plan.aggregated
        clients = got.senders.tolist()
        freq = np.full(len(got), m / plan.available)  # the sampling probability
        if state.participation is not None:
            freq = online_frequencies(state.participation, state.rounds, got.senders)
            count_updates(state.participation, got.senders)
        weights = aggregation_weight_array(self.weighting, got.senders, got.num_samples, self._p, freq)
        got = got.replace(weights=weights, staleness=np.zeros(len(got), dtype=np.int64), bases=payload.params)
        bytes_up = int(got.uplink_bytes().sum())  # what was sent (before `receive` decodes it)
        got, memory = ctx.receive(got, state.rounds, t0)
        state.server = ctx.strategy.combine(state.server, got, CombineContext(ctx.num_clients, state.version, to_seconds(end)))
        ctx.accept(got, memory)

        if ctx.events is not None:
            for client, job_id in zip(jobs.clients.tolist(), jobs.job_ids.tolist()):
                ctx.log(t0, "dispatch", client=client, version=state.version, job=job_id)
            for t, c in plan.losses:
                ctx.log(t, "drop", client=c, version=state.version)
            for t, c in zip(plan.on_time_at.tolist(), clients):
                ctx.log(t, "arrival", client=c, version=state.version, staleness=0)
            for t, c in plan.late:
                ctx.log(plan.cut, "straggler", client=c, version=state.version, would_arrive=to_seconds(t))
            ctx.log(end, "aggregate", version=state.version + 1, clients=clients)

        state.close_round(ctx, got, m, len(plan.late), len(plan.losses), nbytes(payload) * m, bytes_up, end,
                          plan.end_residue)
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


@PROTOCOLS.register("sync")
def sync(
    clients_per_round: Annotated[Optional[int], Ge(1)] = None,
    fraction: Annotated[Optional[float], Range(0.0, 1.0, open_lo=True)] = None,
    deadline: Annotated[Optional[float], Ge(1e-9)] = None,
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = "samples",
    client_weights: Annotated[str, OneOf(IMPORTANCES)] = "samples",
) -> Protocol:
    """Synchronous rounds with client sampling and an optional straggler deadline.

    Args:
        clients_per_round: Clients sampled per round (default: all available clients).
        fraction: Alternatively, the fraction of the population sampled per round.
        deadline: Round deadline in virtual seconds (at least 1e-9, one tick of the clock);
            later results are discarded as stragglers.
        weighting: Aggregation weights: 'samples' (n_i / Σ n_j), 'identical' (1/|S|),
            'unbiased' (p_i / f_i, f_i = sampling probability), 'unbiased_online' (p_i / f_i,
            f_i = the client's share of the rounds so far, this one included).
        client_weights: Client importance p_i in the objective, for 'unbiased': 'samples' or 'uniform'.
    """
    return SyncProtocol(clients_per_round, fraction, deadline, weighting, client_weights)
