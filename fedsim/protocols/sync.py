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
from typing import Annotated, Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ..clock import later, later_each, to_seconds
from ..comm import nbytes
from ..config import Ge, Gt, OneOf, Range
from ..errors import ConfigError
from ..executors.base import Job, JobResult
from ..executors.results import ResultBatch
from ..messages import MsgBatch
from ..registry import PROTOCOLS
from ..rng import numpy_rng
from ..strategy import CombineContext, Payload, Tensor
from .base import (Protocol, ProtocolState, RunContext, check_all_finite, check_rows_finite, uplink_bytes,
                   wait_for_availability)
from .rounds import FINISH, WAIT, RoundProtocol
from .weighting import IMPORTANCES, WEIGHTINGS, aggregation_weight_array, importance


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

    def close_round(self, ctx: RunContext, results: Sequence[JobResult], jobs: int, stragglers: int,
                    dropped: int, bytes_down: int, end: int, rows: np.ndarray | None = None,
                    residue: float = 0.0) -> None:
        """Books a round that aggregated `results` (or its `rows`, in aggregation order) and
        ended at tick `end` (`residue` ticks before its exact end): statistics, counters, clock."""
        rows = np.arange(len(results)) if rows is None else rows
        self.train_loss, self.client_metrics = round_metrics(results, rows)
        self.participants = len(rows)
        self.stragglers += stragglers
        self.dropped += dropped
        self.bytes_down += bytes_down
        if isinstance(results, ResultBatch):
            self.bytes_up += results.uplink_bytes() * len(rows)
        else:
            self.bytes_up += int(sum(uplink_bytes(results[i]) for i in rows.tolist()))
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
    jobs: list[Job]
    results: Sequence[JobResult]  # of the jobs that were not lost, in the jobs' order
    on_time: np.ndarray  # the aggregated jobs (indices into `jobs`), in arrival order
    on_time_at: np.ndarray  # their arrival ticks
    rows: np.ndarray  # their rows in `results`
    late: list[tuple[int, int]]  # (arrival, client) after the deadline: stragglers
    losses: list[tuple[int, int]]  # (when lost, client)
    cut: int | None  # the deadline's tick
    end: int
    end_residue: float  # exact end − end, in ticks


class RoundTiming(NamedTuple):
    """When a round's jobs arrive or are lost, and when the round ends (ticks)."""

    on_time: np.ndarray  # the jobs that arrive by the deadline (indices), by arrival, then client
    on_time_at: np.ndarray  # their arrival ticks
    late: list[tuple[int, int]]  # (arrival, client) of the jobs that arrive after the deadline, same order
    losses: list[tuple[int, int]]  # (when lost, client) of the lost jobs, in job order
    end: int  # the last arrival or loss, cut at the deadline; t0 if nothing happens
    end_residue: float  # exact end − end, in ticks
    cut: int | None  # the deadline's tick (None: no deadline)


def time_round(t0: int, residue: float, clients: np.ndarray, durations: np.ndarray, lost: np.ndarray,
               lost_at: np.ndarray, deadline: float | None) -> RoundTiming:
    """Times a round that starts at tick `t0` (`residue` ticks before its exact start): job i
    of `clients[i]` takes `durations[i]` seconds, or, when `lost[i]`, disappears after the
    fraction `lost_at[i]` of it; results later than `deadline` seconds after the start are
    stragglers (None: no deadline). Every instant is the start plus a duration, rounded once
    (`fedsim.clock.later_each`). Returns the `RoundTiming`."""
    durations = np.asarray(durations, dtype=np.float64)
    came = np.flatnonzero(~lost)
    arrive, _ = later_each(t0, residue, durations[came])
    order = np.lexsort((clients[came], arrive))  # by arrival, then client
    came, arrive = came[order], arrive[order]
    gone = np.flatnonzero(lost)
    lost_after = lost_at[gone] * durations[gone]
    lost_t, _ = later_each(t0, residue, lost_after)
    cut = later(t0, residue, deadline) if deadline is not None else None
    in_time = np.ones(len(came), dtype=bool) if cut is None else arrive <= cut[0]
    late = list(zip(arrive[~in_time].tolist(), clients[came[~in_time]].tolist()))
    losses = list(zip(lost_t.tolist(), clients[gone].tolist()))
    # `later` is monotone in the duration: the last instant is the one of the longest span
    end = later(t0, residue, max(durations[came].max(initial=0.0), lost_after.max(initial=0.0)))
    if cut is not None:
        end = min(end, cut)
    return RoundTiming(came[in_time], arrive[in_time], late, losses, end[0], end[1],
                       cut[0] if cut is not None else None)


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
        ran = np.flatnonzero(~lost)  # results[k] belongs to jobs[ran[k]]
        results = ctx.executor.run([jobs[i] for i in ran.tolist()])
        # a client whose code raised (executor.on_client_error='drop') is lost when its job would end
        row = np.full(m, -1, dtype=np.int64)
        row[ran] = np.arange(len(ran))
        failed = np.zeros(m, dtype=bool)
        ups = np.zeros(m, dtype=np.int64)
        if isinstance(results, ResultBatch):  # stacked results never hold a failure
            ups[ran] = results.uplink_bytes() if len(ran) else 0
        else:
            failed[ran] = [r.failed for r in results]
            ups[ran] = [0 if r.failed else uplink_bytes(r) for r in results]
        lost, lost_at = lost | failed, np.where(failed, 1.0, lost_at)
        durations = ctx.population.job_seconds(cohort, [j.num_steps for j in jobs], np.full(m, down), ups, job_ids)
        timing = time_round(t0, state.residue, cohort, durations, lost, lost_at, self.deadline)
        if timing.end > ctx.budget_ticks():
            return FINISH
        return SyncRound(t0, len(available), payload, jobs, results, timing.on_time, timing.on_time_at,
                         row[timing.on_time], timing.late, timing.losses, timing.cut, timing.end, timing.end_residue)

    def plan_end(self, plan: SyncRound | str) -> int | None:
        return plan.end if isinstance(plan, SyncRound) else None

    def apply(self, ctx: RunContext, state: SyncState, plan: SyncRound | str) -> SyncState:
        if plan == FINISH:
            state.finished = True
            return state
        if plan == WAIT:
            return wait_for_availability(ctx, state)
        t0, end, m, payload = plan.t0, plan.end, len(plan.jobs), plan.payload
        jobs, on_time, rows, results = plan.jobs, plan.on_time, plan.rows, plan.results
        clients = [jobs[i].client for i in on_time.tolist()]
        weights = aggregation_weight_array(
            self.weighting, clients, [jobs[i].num_samples for i in on_time.tolist()], self._p,
            np.full(len(clients), m / plan.available),
        )
        msgs = MsgBatch(results, rows, weights, None, payload.params)
        if msgs.stacked:
            check_rows_finite(msgs.updates, clients, state.rounds, t0)
        else:
            check_all_finite([results[i] for i in rows.tolist()], state.rounds, t0)
        state.server = ctx.strategy.combine(
            state.server, msgs, CombineContext(ctx.num_clients, state.version, to_seconds(end))
        )
        if isinstance(results, ResultBatch):
            if results.state:  # the store copies each row it keeps
                for c, i in zip(clients, rows.tolist()):
                    ctx.store.put(c, {k: v[i] for k, v in results.state.items()})
        else:
            for c, i in zip(clients, rows.tolist()):
                ctx.store.put(c, results[i].output.state)

        if ctx.events is not None:
            for job in jobs:
                ctx.log(t0, "dispatch", client=job.client, version=state.version, job=job.job_id)
            for t, c in plan.losses:
                ctx.log(t, "drop", client=c, version=state.version)
            for t, c in zip(plan.on_time_at.tolist(), clients):
                ctx.log(t, "arrival", client=c, version=state.version, staleness=0)
            for t, c in plan.late:
                ctx.log(plan.cut, "straggler", client=c, version=state.version, would_arrive=to_seconds(t))
            ctx.log(end, "aggregate", version=state.version + 1, clients=clients)

        state.close_round(ctx, results, m, len(plan.late), len(plan.losses), nbytes(payload) * m, end, rows,
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


def mean_client_metrics(metrics: list[Mapping[str, Any]], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Returns {name: mean over the clients that reported it} for every scalar client metric not in `skip`."""
    seen: dict[str, list[float]] = {}
    for m in metrics:
        for k, v in m.items():
            if k not in skip and v is not None:
                seen.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in seen.items()}


def round_metrics(results: Sequence[JobResult], rows: np.ndarray) -> tuple[float | None, dict[str, float]]:
    """Returns (mean train_loss, {name: mean} of the other client metrics) over `results`' `rows`
    (None / absent when no client reported one); reads a `ResultBatch`'s metric columns directly."""
    if isinstance(results, ResultBatch):
        means = {k: float(np.mean(np.asarray(col)[rows])) for k, col in results.metrics.items() if len(rows)}
        return means.pop("train_loss", None), means
    metrics = [results[i].output.metrics for i in rows.tolist()]
    losses = [x for x in (m.get("train_loss") for m in metrics) if x is not None]
    return (float(np.mean(losses)) if losses else None), mean_client_metrics(metrics, skip=("train_loss",))


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
