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
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..clock import tick_after, to_seconds, to_ticks
from ..config.load import Config
from ..data.base import FederatedData
from ..data.batching import job_indices
from ..data.hashed_order import DeferredIndices, DeviceOrders, job_indices_hashed, job_keys
from ..contributions import Contributions
from ..executors.base import Executor, Job
from ..executors.job_batch import JobBatch, PayloadRows
from ..outputs import EventLog
from ..rng import numpy_rng, numpy_rngs
from ..state_store import ClientStateStore
from ..strategy import Payload, Strategy, Tensor
from ..task import Task
from ..vec import stack_on
from .clocks import Clock


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
        clock: Clock,
        executor: Executor,
        store: ClientStateStore,
        events: EventLog | None = None,
        memory: ClientStateStore | None = None,
    ):
        self.config = config
        self.data = data
        self.task = task
        self.strategy = strategy
        self.clock = clock
        self.population = clock.population  # the behaviour models, under virtual time (else None)
        self.executor = executor
        self.store = store  # each client's persistent state (travels with its jobs)
        self.memory = memory if memory is not None else ClientStateStore()  # the server's memory of each sender
        self.events = events
        self.seed = config.seed
        self.run = config.run
        self.num_clients = data.num_clients
        self.initial_params = task.initial_params()
        local = config.local
        self.hashed = local.shuffle == "hash"
        self.device_orders = None  # the executor computes hashed orders of whole cohorts on its device
        if self.hashed and executor.order_device is not None:
            self.device_orders = DeviceOrders(data.client_train, local.batch_size, local.epochs, local.steps,
                                              local.sampling, local.drop_last, self.seed, executor.order_device,
                                              static=executor.order_graphs)

    def client_state(self, client: int) -> dict[str, Tensor]:
        """Returns the client's stored state, or a fresh initial state (not stored until accepted)."""
        state = self.store.get(client)
        if state is None:
            init = self.strategy.client_state
            state = init(self.initial_params) if init is not None else {}
        return state

    def make_job(self, client: int, payload: Payload, version: int, job_id: int) -> Job:
        """Builds the job of `client` from `payload`; its batches are keyed by (seed, client, job_id)."""
        if self.hashed:
            return self._job(client, payload, version, job_id, None)
        return self._job(client, payload, version, job_id, numpy_rng(self.seed, "batches", client, job_id))

    def make_jobs(self, clients: Sequence[int], payloads: Payload | Sequence[Payload], version: int,
                  job_ids: Sequence[int]) -> JobBatch:
        """Builds the jobs of one dispatch (one payload for all, or one each: a list, or
        `PayloadRows` holding them stacked) as a `JobBatch`
        whose jobs equal `make_job`'s, with the keyed generators seeded in bulk; when the
        executor computes hashed orders on its device, no per-job object is made at all."""
        clients = np.asarray(clients, dtype=np.int64).reshape(-1)
        job_ids = np.asarray(job_ids, dtype=np.int64).reshape(-1)
        n = len(clients)
        shared = payloads if isinstance(payloads, (Payload, PayloadRows)) else list(payloads)
        at = clients.tolist()
        # a stateless strategy never stores a state
        states = None if self.strategy.client_state is None else [self.client_state(c) for c in at]
        versions = np.full(n, version, dtype=np.int64)
        orders = self.device_orders
        if orders is not None:
            counts = orders.counts[clients]
            sizes, which = np.unique(counts, return_inverse=True)
            shapes = np.array([orders.shape_for(int(s)) for s in sizes], dtype=np.int64).reshape(-1, 2)[which]
            return JobBatch(clients, job_ids, versions, counts, shapes, shared, states, None, orders)
        if self.hashed:
            indices = [self._indices(c, j, None) for c, j in zip(at, job_ids.tolist())]
        else:
            gens = numpy_rngs(self.seed, "batches", at, job_ids.tolist())
            indices = [self._indices(c, 0, g) for c, g in zip(at, gens)]
        counts = np.fromiter((len(self.data.client_train[c]) for c in at), np.int64, n)
        shapes = np.array([ix.shape for ix in indices], dtype=np.int64).reshape(n, 2)
        return JobBatch(clients, job_ids, versions, counts, shapes, shared, states, indices)

    def _job(self, client: int, payload: Payload, version: int, job_id: int, rng: np.random.Generator | None) -> Job:
        """One job; `rng` None: the hashed order (`local.shuffle: hash`), left to the executor's
        device when it computes orders itself."""
        if self.device_orders is not None:
            indices = DeferredIndices(self.device_orders, client, job_id, self.device_orders.shape(client))
        else:
            indices = self._indices(client, job_id, rng)
        return Job(job_id, client, version, payload, self.client_state(client), indices, self.data.num_samples(client))

    def _indices(self, client: int, job_id: int, rng: np.random.Generator | None) -> np.ndarray:
        """The [K, B] sample indices of `client`'s job, drawn on the host: from `rng`, or (None)
        the hashed order keyed by (seed, client, job_id)."""
        local = self.config.local
        if rng is None:
            return job_indices_hashed(self.data.client_train[client], local.batch_size, local.epochs, local.steps,
                                      local.sampling, local.drop_last, job_keys(self.seed, client, job_id))
        return job_indices(self.data.client_train[client], local.batch_size, local.epochs, local.steps,
                           local.sampling, local.drop_last, rng)

    def receive(self, contribs: Contributions, round_: int, time: int) -> tuple[Contributions, dict[str, Tensor]]:
        """Returns `contribs` as combine reads them — after the malicious senders' attack and the strategy's ``receive`` step,
        given its senders' memory — and the senders' new memory rows; raises DivergenceError
        if an update has NaN or inf entries (the one finiteness check of every protocol)."""
        memory: dict[str, Tensor] = {}
        if self.population is not None:  # malicious senders rewrite what they send (system.adversary)
            contribs = self.population.tamper(contribs)
        receive = getattr(self.strategy, "receive", None)
        if receive is not None and len(contribs):
            home = contribs.updates.device if contribs.stacked else self.initial_params.device
            contribs, memory = receive(contribs, self._memory_rows(contribs.senders, home))
        contribs.check_finite(round_, to_seconds(time))
        return contribs, memory

    def _memory_rows(self, senders: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """The senders' memory rows (stored, or initial for a first-time sender), stacked on `device`."""
        init = getattr(self.strategy, "sender_memory", None)
        if init is None:
            return {}
        rows = []
        for s in senders.tolist():
            got = self.memory.get(s)
            rows.append(got if got is not None else init(self.initial_params))
        return {k: stack_on([r[k] for r in rows], device) for k in rows[0]}

    def accept(self, contribs: Contributions, memory: Mapping[str, Tensor] | None = None) -> None:
        """Keeps what the acceptance of `contribs` changes: each sender's new client state and
        the server's new memory of it (`receive`)."""
        self.executor.keep_states(contribs.jobs, contribs.senders)
        senders = contribs.senders.tolist()
        if contribs.state:
            self.store.put_many(senders, contribs.state)
        if memory:
            self.memory.put_many(senders, memory)

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
    nxt = ctx.clock.next_availability_change(t0)
    if not math.isfinite(nxt) or to_ticks(nxt) > ctx.budget_ticks():
        state.finished = True
        return state
    ctx.log(t0, "idle", until=nxt)
    state.time, state.residue = tick_after(t0, nxt), 0.0
    return state


class Protocol(ABC):
    """A scheduler of rounds or events; see the module docstring."""

    strategy_kind: str = "server"  # the kind of strategy it drives: 'server' or 'gossip' (fedsim.strategy)
    drops_failed_jobs: bool = False  # treats a job whose code failed (executor.on_client_error='drop') as a drop
    # the clock moves whatever the jobs take (FedFix windows that clients wait for): under virtual
    # time, run.time_budget is reached even if no job takes virtual time (fedsim.stall)
    clock_runs_alone: bool = False
    # a step changes the state only once its jobs' results are in: a step that gives up waiting
    # for them (a signal, lost workers) leaves the state as the previous step left it
    state_kept_while_waiting: bool = False

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

    def node_params(self, ctx: RunContext, state: ProtocolState) -> Tensor | None:
        """Returns the ``[num_clients, d]`` stack of the clients' own models where each keeps
        one (the gossip protocols), else None (one global model: `eval_params`)."""
        return None

    def eval_metrics(self, ctx: RunContext, state: ProtocolState) -> dict[str, Any]:
        """Returns protocol-specific metrics for an evaluation row (may reset accumulators)."""
        return {}


__all__ = ["Protocol", "ProtocolState", "RunContext", "wait_for_availability"]
