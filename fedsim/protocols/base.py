"""What every protocol shares: its progress state, the run context, and the interface.

A protocol says *when* things happen (sync rounds, async arrivals, gossip). It
is a small state machine driven by `fedsim.runner`: ``init`` makes the state, ``step``
advances it by one round or one event, and the runner evaluates and checkpoints between
steps. All protocol state lives in the returned dataclass, never in the protocol object.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..clock import to_seconds, to_ticks
from ..comm import nbytes
from ..config.load import Config
from ..data.base import FederatedData
from ..data.batching import job_indices
from ..errors import DivergenceError
from ..executors.base import Executor, Job, JobResult
from ..outputs import EventLog
from ..rng import numpy_rng, numpy_rngs
from ..state_store import ClientStateStore
from ..strategy import Payload, Strategy, Tensor
from ..system.population import Population
from ..task import Task


@dataclass
class ProtocolState:
    """Progress counters every protocol keeps; protocols subclass it with their own fields."""

    rounds: int = 0  # completed rounds (server-based: aggregations)
    aggregations: int = 0  # times a receiver folded messages into its model
    time: int = 0  # virtual time in ticks
    residue: float = 0.0  # exact virtual time − time, in ticks (fedsim.clock: durations add up unrounded)
    bytes_up: int = 0
    bytes_down: int = 0
    next_job: int = 0  # global job counter (keys each job's batches and randomness)
    finished: bool = False


class RunContext:
    """Everything built from the config that protocols use; read-only for them."""

    def __init__(
        self,
        config: Config,
        data: FederatedData,
        task: Task,
        strategy: Strategy,
        population: Population,
        executor: Executor,
        store: ClientStateStore,
        events: EventLog | None = None,
    ):
        self.config = config
        self.data = data
        self.task = task
        self.strategy = strategy
        self.population = population
        self.executor = executor
        self.store = store
        self.events = events
        self.seed = config.seed
        self.run = config.run
        self.num_clients = data.num_clients
        self.initial_params = task.initial_params()

    def client_state(self, client: int) -> dict[str, Tensor]:
        """Returns the client's stored state, or a fresh initial state (not stored until accepted)."""
        state = self.store.get(client)
        if state is None:
            init = self.strategy.client_state
            state = init(self.initial_params) if init is not None else {}
        return state

    def make_job(self, client: int, payload: Payload, version: int, job_id: int) -> Job:
        """Builds the job of `client` from `payload`; its batches are keyed by (seed, client, job_id)."""
        return self._job(client, payload, version, job_id, numpy_rng(self.seed, "batches", client, job_id))

    def make_jobs(self, clients: Sequence[int], payloads: Payload | Sequence[Payload], version: int,
                  job_ids: Sequence[int]) -> list[Job]:
        """Builds many jobs at once (one payload for all, or one each); equal to calling
        `make_job` for each, with the keyed generators seeded in bulk."""
        clients, job_ids = [int(c) for c in clients], [int(j) for j in job_ids]
        each = payloads if not isinstance(payloads, Payload) else [payloads] * len(clients)
        gens = numpy_rngs(self.seed, "batches", clients, job_ids)
        return [self._job(c, p, version, j, g) for c, p, j, g in zip(clients, each, job_ids, gens)]

    def _job(self, client: int, payload: Payload, version: int, job_id: int, rng: np.random.Generator) -> Job:
        local = self.config.local
        indices = job_indices(self.data.client_train[client], local.batch_size, local.epochs, local.steps,
                              local.sampling, local.drop_last, rng)
        return Job(job_id, client, version, payload, self.client_state(client), indices, self.data.num_samples(client))

    def log(self, time: int, kind: str, **fields: Any) -> None:
        """Appends an event to events.jsonl when `run.log_events` is on."""
        if self.events is not None:
            self.events.write(time, kind, **fields)

    def budget_ticks(self) -> float:
        """Returns run.time_budget in ticks (inf when unset)."""
        return to_ticks(self.run.time_budget) if self.run.time_budget is not None else math.inf

    def out_of_rounds(self, state: ProtocolState) -> bool:
        """True when run.rounds is set and reached."""
        return self.run.rounds is not None and state.rounds >= self.run.rounds


def wait_for_availability(ctx: RunContext, state: ProtocolState) -> ProtocolState:
    """With no client available now: moves the state to the next availability change, or
    finishes it when there is none before the time budget. Returns the state."""
    t0 = state.time
    nxt = ctx.population.next_availability_change(to_seconds(t0))
    if not math.isfinite(nxt) or to_ticks(nxt) > ctx.budget_ticks():
        state.finished = True
        return state
    ctx.log(t0, "idle", until=nxt)
    # at least one tick later: a slot boundary computed in float seconds can round back onto t0
    state.time, state.residue = max(to_ticks(nxt), t0 + 1), 0.0
    return state


def diverged(client: int, round_: int, time: int) -> DivergenceError:
    """Returns the error for a client whose update has NaN or inf entries."""
    return DivergenceError(f"client {client}'s update has NaN/inf in round {round_} (virtual time "
                           f"{to_seconds(time):.6g} s); lower local.lr or the server learning rate")


def check_finite(result: JobResult, round_: int, time: int) -> None:
    """Raises DivergenceError if a client's update has NaN or inf entries."""
    upd = result.output.update
    if isinstance(upd, torch.Tensor) and not bool(torch.isfinite(upd).all()):
        raise diverged(result.client, round_, time)


def suspect_rows(totals: Tensor) -> list[int]:
    """Returns the indices of the non-finite entries of `totals` (one device sync)."""
    return torch.nonzero(~torch.isfinite(totals)).flatten().tolist()


def check_all_finite(results: Sequence[JobResult], round_: int, time: int) -> None:
    """`check_finite` for a whole aggregation at the cost of one reduction per update and one
    device synchronisation: each update is reduced to one number (its sum on the CPU, its L1
    norm in one fused kernel elsewhere) in which a NaN or inf entry survives; the few updates
    so flagged (an overflowing sum too) are then checked entry by entry."""
    tensors = [(r, r.output.update) for r in results if isinstance(r.output.update, torch.Tensor)]
    if not tensors:
        return
    ups = [u for _, u in tensors]
    same = all(u.device == ups[0].device and u.dtype == ups[0].dtype for u in ups)
    if not same:
        for r, _ in tensors:
            check_finite(r, round_, time)
        return
    totals = torch._foreach_norm(ups, 1) if ups[0].device.type != "cpu" else [u.sum() for u in ups]
    for i in suspect_rows(torch.stack(totals)):
        check_finite(tensors[i][0], round_, time)


def check_rows_finite(updates: Tensor, clients: Sequence[int], round_: int, time: int) -> None:
    """`check_all_finite` for updates stacked as rows ``[m, ...]`` (row i from `clients[i]`):
    one reduction per row and one device synchronisation; raises DivergenceError naming the
    first client whose update has NaN or inf entries."""
    if len(updates) == 0:
        return
    flat = updates.reshape(len(updates), -1)
    totals = flat.sum(1) if flat.device.type == "cpu" else torch.linalg.vector_norm(flat, 1, dim=1)
    for i in suspect_rows(totals):  # an overflowing sum is a false alarm: check those rows entry by entry
        if not bool(torch.isfinite(flat[i]).all()):
            raise diverged(clients[i], round_, time)


def uplink_bytes(result: JobResult) -> int:
    """Returns the bytes the client sent for this result."""
    return nbytes(result.output)


class Protocol(ABC):
    """A scheduler of rounds or events; see the module docstring."""

    requires: str = "server"  # 'server' (needs combine) or 'decentralized' (needs merge)
    drops_failed_jobs: bool = False  # treats a failed JobResult (executor.on_client_error='drop') as a drop

    def setup(self, ctx: RunContext) -> None:
        """Validates the protocol against the run and derives constants (called once, before
        `init` or before restoring a checkpointed state)."""

    @abstractmethod
    def init(self, ctx: RunContext) -> ProtocolState:
        """Returns the initial state (global model(s) from ctx.initial_params)."""

    @abstractmethod
    def step(self, ctx: RunContext, state: ProtocolState) -> ProtocolState:
        """Advances by one round or event; sets `finished` when the stopping rule is met."""

    def resume(self, ctx: RunContext, state: ProtocolState) -> None:
        """Re-submits work that was in flight when `state` was checkpointed (executors start empty)."""

    def next_time(self, ctx: RunContext, state: ProtocolState) -> int | None:
        """Returns the tick at which the next step takes effect (for time-based evaluation)."""
        return state.time

    @abstractmethod
    def eval_params(self, ctx: RunContext, state: ProtocolState) -> Tensor:
        """Returns the model to evaluate (the global model, or the nodes' average)."""

    def eval_metrics(self, ctx: RunContext, state: ProtocolState) -> dict[str, Any]:
        """Returns protocol-specific metrics for an evaluation row (may reset accumulators)."""
        return {}


__all__ = ["Protocol", "ProtocolState", "RunContext", "check_finite", "uplink_bytes", "wait_for_availability"]
