"""The asynchronous schedule: who is in flight, when updates arrive, when the server aggregates.

This module knows nothing of models or learning. It moves jobs through an event queue
(`fedsim.clock.EventQueue`, integer ticks) and calls four hooks at the moments where the
learning side acts (`Hooks`). When a job computes, whether it is lost and when it arrives
come from the run's clock (`fedsim.protocols.clocks`): predicted from the population's
behaviour models under virtual time, observed as replies come in under wall time. With
`Trace` as the hooks it simulates a schedule alone — the frequencies Fraboni et al.'s
"weight" variants need, and schedule tests without learning.

A run keeps `Rules.concurrency` job slots filled. Per job:

1. *dispatch* at t0: an idle, available client gets the current model version; its
   compute end is t0 + compute + download time (`done` event);
2. *done*: the result is fetched, and the arrival is t0 + the full duration, now that the
   uplink's real size is known (`arrival` event; for an ideal link, at the same tick).
   Under virtual time t0 is the exact instant of the event that freed the slot (its tick
   and residue, `fedsim.clock`), so a client's chain of jobs ends where the exact sum of
   its durations falls, never off by one rounding per job;
3. *arrival*: staleness = versions published since dispatch; beyond `max_staleness` the
   update is discarded, otherwise buffered. The server aggregates when the buffer holds
   `buffer_size` updates — or, with a `window`, at every multiple of the window (possibly
   over an empty buffer, as in Fraboni et al.'s code).
4. *re-dispatch*: the freed slot is refilled at once (``immediate``) or at the next
   aggregation (``aggregation``: the client waits for the new model). Lost jobs and
   discarded updates free their slot at once (nothing to wait for).

The schedule stops at the time budget T: nothing that would happen after T is done. With
`Rules.complete_buffer`, a buffer that holds updates at T but is not full is instead
waited for — the schedule runs on past T until that buffer aggregates, then stops —
which is how Fraboni et al.'s FedBuff loop ends (it only asks that the first update of
an aggregation arrive by T).

Ties at one tick are ordered: compute ends, then arrivals (lowest client id first, as
Fraboni et al.'s argmin), then losses, then the window tick, so a client whose duration is
an exact multiple of the window is aggregated in the window that ends at its arrival.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..clock import EventQueue, tick_after, to_seconds
from ..rng import CounterRngs, draw_one
from ..state_types import checkpointable
from .base import ProtocolState
from .clocks import Clock

IMMEDIATE, AT_AGGREGATION = "immediate", "aggregation"
_RANK = {"done": 0, "arrival": 1, "lost": 2, "window": 3, "retry": 4}


def priority(kind: str, client: int = 0) -> int:
    """Returns the tie-break priority of an event: by kind (see module docstring), then client id."""
    return (_RANK[kind] << 32) | int(client)


@dataclass(frozen=True)
class Rules:
    """When the server aggregates and when a freed slot is refilled."""

    concurrency: int  # job slots kept filled
    buffer_size: int = 1  # aggregate when this many updates are buffered (no window)
    window: int | None = None  # aggregate at every multiple of this many ticks instead
    redispatch: str = IMMEDIATE  # or AT_AGGREGATION
    max_staleness: int | None = None  # discard updates staler than this
    complete_buffer: bool = False  # at the budget, run on until a partly filled buffer aggregates


@checkpointable
@dataclass(frozen=True)
class Flight:
    """A job in flight: its client, the model version it started from, when, and its size."""

    job: int
    client: int
    version: int
    start: int  # tick
    steps: int
    bytes_down: int
    start_residue: float = 0.0  # exact start − start, in ticks


@checkpointable
@dataclass(frozen=True)
class Update:
    """An arrived, buffered update waiting for the next aggregation."""

    job: int
    client: int
    version: int
    time: int
    staleness: int


@dataclass
class ScheduleState(ProtocolState):
    """Progress of the schedule; learning protocols extend it with their model state."""

    queue: EventQueue = field(default_factory=EventQueue)
    version: int = 0
    free: int = 0  # slots to refill now
    flights: dict[int, Flight] = field(default_factory=dict)
    buffer: list[Update] = field(default_factory=list)
    parked: list[int] = field(default_factory=list)  # clients waiting for the next aggregation
    retry_at: int | None = None
    dropped: int = 0
    discarded: int = 0
    empty_windows: int = 0  # windows that received nothing (no aggregation, no new version)


class Hooks:
    """What the learning side does at each moment of the schedule (`dispatch` and `finish`
    must be provided; the others do nothing by default)."""

    def dispatch(self, st: Any, client: int, job: int, submit: bool) -> tuple[int, int]:
        """Prepares (and, if `submit`, starts) a job; returns (local steps, bytes down)."""
        raise NotImplementedError

    def finish(self, st: Any, flight: Flight) -> int | None:
        """Fetches a finished job's result; returns the bytes it sends up (None: the job
        failed and the client counts as dropped)."""
        raise NotImplementedError

    def aggregate(self, st: Any, updates: list[Update], time: int) -> None:
        """Folds the buffered updates into the model (before the version moves on)."""

    def empty_window(self, st: Any, time: int) -> None:
        """A window ended with nothing to aggregate (the model and its version stay)."""

    def release(self, st: Any, job: int, version: int) -> None:
        """Forgets a job that will not be aggregated (lost, or too stale)."""

    def log(self, time: int, kind: str, **fields: Any) -> None:
        """Records a schedule event (dispatch, arrival, aggregate, drop, discard)."""


class Trace(Hooks):
    """Hooks for a schedule without learning: records events and who each aggregation holds."""

    def __init__(self, job_steps: Callable[[int, int], int], bytes_down: int = 0, bytes_up: int = 0,
                 keep_events: bool = False):
        self.job_steps = job_steps
        self.bytes_down = bytes_down
        self.bytes_up = bytes_up
        self.keep_events = keep_events
        self.events: list[dict[str, Any]] = []
        self.aggregations: list[list[int]] = []  # clients of each aggregation, in buffer order

    def dispatch(self, st: Any, client: int, job: int, submit: bool) -> tuple[int, int]:
        return self.job_steps(client, job), self.bytes_down

    def finish(self, st: Any, flight: Flight) -> int:
        return self.bytes_up

    def aggregate(self, st: Any, updates: list[Update], time: int) -> None:
        self.aggregations.append([u.client for u in updates])

    def empty_window(self, st: Any, time: int) -> None:
        self.aggregations.append([])  # a period of FedFix's frequencies f_i (updates per window)

    def log(self, time: int, kind: str, **fields: Any) -> None:
        if self.keep_events:
            self.events.append({"time": to_seconds(time), "kind": kind, **fields})

    def frequencies(self, num_clients: int) -> np.ndarray:
        """Returns f_i: client i's updates per aggregation (per window, empty ones included,
        with a window), averaged over the traced schedule."""
        counts = np.zeros(num_clients)
        for members in self.aggregations:
            for c in members:
                counts[c] += 1
        return counts / max(len(self.aggregations), 1)


SPARSE_POPULATION = 20_000  # from this many clients on, an always-available population's idle clients are not scanned


class InFlight:
    """How many jobs each client has in flight in one schedule state, and (`sparse`) the
    sorted ids of the clients with any, kept as jobs start and end."""

    __slots__ = ("state", "counts", "busy")

    def __init__(self, st: ScheduleState, num_clients: int, sparse: bool):
        self.state = st
        self.counts = np.zeros(num_clients, dtype=np.int64)
        np.add.at(self.counts, np.fromiter((f.client for f in st.flights.values()), np.int64, len(st.flights)), 1)
        self.busy = np.flatnonzero(self.counts) if sparse else None

    def start(self, client: int) -> None:
        self.counts[client] += 1
        if self.busy is not None and self.counts[client] == 1:
            self.busy = np.insert(self.busy, np.searchsorted(self.busy, client), client)

    def end(self, client: int) -> None:
        self.counts[client] -= 1
        if self.busy is not None and self.counts[client] == 0:
            self.busy = np.delete(self.busy, np.searchsorted(self.busy, client))


class Engine:
    """Drives a `ScheduleState` event by event under `Rules`, calling `Hooks`; `executor` is
    what a wall clock polls for finished jobs (None under virtual time)."""

    def __init__(self, rules: Rules, clock: Clock, num_clients: int, seed: int,
                 budget: float = math.inf, max_aggregations: int | None = None, executor: Any = None):
        self.rules = rules
        self.clock = clock
        self.executor = executor
        self.num_clients = num_clients
        self.seed = seed
        self.budget = budget  # ticks (inf: none)
        self.max_aggregations = max_aggregations
        self._flying: InFlight | None = None  # jobs in flight per client, of its state
        self._draws = CounterRngs(seed, "async/dispatch")  # numpy_rng(seed, "async/dispatch", job), in bulk
        # a large population that is always available: idle clients are found from the busy
        # ones (`_draw_idle`), not by scanning every client at every event
        self.sparse = num_clients >= SPARSE_POPULATION and clock.always_available
        self._handlers = {"done": self._on_done, "arrival": self._on_arrival, "lost": self._on_lost,
                          "window": self._on_window, "retry": self._on_retry}

    def _in_flight(self, st: ScheduleState) -> "InFlight":
        """Returns the jobs in flight of `st` per client (counted from its flights the first
        time a state is seen, then kept as jobs start and end)."""
        if self._flying is None or self._flying.state is not st:
            self._flying = InFlight(st, self.num_clients, self.sparse)
        return self._flying

    def _landed(self, st: ScheduleState, job: int) -> Flight:
        """Removes `job` from the flights of `st` and returns it."""
        f = st.flights.pop(job)
        if self._flying is not None and self._flying.state is st:
            self._flying.end(f.client)
        return f

    # ------------------------------------------------------------------ driving
    def start(self, st: ScheduleState, hooks: Hooks) -> ScheduleState:
        """Schedules the first window tick and fills every slot at time 0."""
        if self.rules.window is not None:
            st.queue.push(self.rules.window, "window", priority("window"))
        st.free = self.rules.concurrency
        self._fill(st, hooks)
        return st

    def next_time(self, st: ScheduleState) -> int | None:
        """Returns the tick of the next event (None when nothing is scheduled)."""
        ev = st.queue.peek()
        return ev.time if ev is not None else None

    def step(self, st: ScheduleState, hooks: Hooks) -> ScheduleState:
        """Handles the next event; sets `finished` at the budget (or, completing the last buffer,
        once it is aggregated), the aggregation cap, or when idle."""
        self.clock.wait(st, self.executor, priority)
        ev = st.queue.peek()
        capped = self.max_aggregations is not None and st.aggregations >= self.max_aggregations
        completing = self.rules.complete_buffer and bool(st.buffer)
        if capped or ev is None or (ev.time > self.budget and not completing):
            st.finished = True
            if not capped and st.time < self.budget < math.inf:
                st.time, st.residue = int(self.budget), 0.0  # nothing changes the model until the budget ends
            return st
        ev = st.queue.pop()
        st.time, st.residue = ev.time, ev.residue
        self._handlers[ev.kind](st, hooks, ev.time, **ev.data)
        self._fill(st, hooks)
        return st

    def run(self, st: ScheduleState, hooks: Hooks) -> ScheduleState:
        """Starts and steps the schedule to its end (schedule-only use: `Trace` hooks)."""
        self.start(st, hooks)
        while not st.finished:
            self.step(st, hooks)
        return st

    # ------------------------------------------------------------------ events
    def _on_done(self, st: ScheduleState, hooks: Hooks, t: int, job: int) -> None:
        f = st.flights[job]
        up = hooks.finish(st, f)
        if up is None:  # the client's code failed (executor.on_client_error='drop'): lost now
            st.queue.push(t, "lost", priority("lost", f.client), job=job)
            return
        at, residue = self.clock.arrival(f, up, (t, st.residue))
        st.queue.push(at, "arrival", priority("arrival", f.client), residue=residue, job=job)

    def _on_arrival(self, st: ScheduleState, hooks: Hooks, t: int, job: int) -> None:
        f = self._landed(st, job)
        staleness = st.version - f.version
        hooks.log(t, "arrival", client=f.client, version=f.version, staleness=staleness, job=job)
        if self.rules.max_staleness is not None and staleness > self.rules.max_staleness:
            hooks.log(t, "discard", client=f.client, staleness=staleness, job=job)
            hooks.release(st, job, f.version)
            st.discarded += 1
            st.free += 1
            return
        st.buffer.append(Update(job, f.client, f.version, t, staleness))
        if self.rules.redispatch == AT_AGGREGATION:
            st.parked.append(f.client)
        else:
            st.free += 1
        if self.rules.window is None and len(st.buffer) >= self.rules.buffer_size:
            self._aggregate(st, hooks, t)

    def _on_lost(self, st: ScheduleState, hooks: Hooks, t: int, job: int) -> None:
        f = self._landed(st, job)
        hooks.log(t, "drop", client=f.client, version=f.version, job=job)
        hooks.release(st, job, f.version)
        st.dropped += 1
        st.free += 1

    def _on_window(self, st: ScheduleState, hooks: Hooks, t: int) -> None:
        if st.buffer:  # an empty window changes nothing: no aggregation, no new version
            self._aggregate(st, hooks, t)
        else:
            st.empty_windows += 1
            hooks.empty_window(st, t)
            hooks.log(t, "empty_window", version=st.version)
            if not st.flights and st.retry_at is None:
                return  # nothing can arrive any more: let the schedule end (idle)
        st.queue.push(t + self.rules.window, "window", priority("window"))

    def _on_retry(self, st: ScheduleState, hooks: Hooks, t: int) -> None:
        st.retry_at = None

    # ------------------------------------------------------------------ actions
    def _aggregate(self, st: ScheduleState, hooks: Hooks, t: int) -> None:
        updates, st.buffer = st.buffer, []
        hooks.aggregate(st, updates, t)
        st.version += 1
        st.aggregations += 1
        st.rounds = st.aggregations
        hooks.log(t, "aggregate", version=st.version, clients=[u.client for u in updates],
                  jobs=[u.job for u in updates], staleness=[u.staleness for u in updates])
        st.free += len(st.parked)
        st.parked = []

    def _fill(self, st: ScheduleState, hooks: Hooks) -> None:
        """Dispatches idle, available clients into the free slots (all of them if they fit,
        else a keyed uniform draw), lowest id first; schedules a retry if some slot stays empty."""
        if st.free <= 0:
            return
        t = st.time
        if self.sparse:
            ready = self._draw_idle(st)
        else:
            counts = self._in_flight(st).counts
            if st.parked:
                busy = counts > 0
                busy[st.parked] = True
                idle = np.flatnonzero(~busy).astype(np.int64, copy=False)
            else:
                idle = np.flatnonzero(counts == 0).astype(np.int64, copy=False)
            ready = self.clock.available(idle, t) if len(idle) else idle
            if len(ready) > st.free:
                gen = self._draws.get(st.next_job)
                ready = draw_one(gen, ready) if st.free == 1 else np.sort(gen.choice(ready, st.free, replace=False))
        for client in ready.tolist():
            self._dispatch(st, hooks, client, t)
        if st.free > 0 and st.retry_at is None:
            nxt = self.clock.next_availability_change(t)
            if math.isfinite(nxt):
                st.retry_at = tick_after(t, nxt)
                st.queue.push(st.retry_at, "retry", priority("retry"))

    def _draw_idle(self, st: ScheduleState) -> np.ndarray:
        """`_fill`'s clients when every client is always available, found from the busy ones
        (in flight or parked) in time that grows with them, not with the population: the same
        draws as drawing from the list of idle clients (numpy's ``choice`` of an array takes
        the positions it draws for the array's length, and the k-th idle client is k plus the
        number of busy clients before it)."""
        busy = self._in_flight(st).busy
        if st.parked:
            busy = np.union1d(busy, np.asarray(st.parked, dtype=np.int64))
        n_idle = self.num_clients - len(busy)
        if n_idle <= st.free:  # every idle client gets a slot
            return np.setdiff1d(np.arange(self.num_clients, dtype=np.int64), busy, assume_unique=True)
        gen = self._draws.get(st.next_job)
        at = (np.array([gen.integers(n_idle)], dtype=np.int64) if st.free == 1  # as `draw_one`
              else np.sort(gen.choice(n_idle, st.free, replace=False)))
        return at + np.searchsorted(busy - np.arange(len(busy)), at, side="right")

    def _dispatch(self, st: ScheduleState, hooks: Hooks, client: int, t: int) -> None:
        job = st.next_job
        st.next_job += 1
        st.free -= 1
        lost_at = self.clock.lost_at(client, job)
        steps, down = hooks.dispatch(st, client, job, submit=lost_at is None)
        st.flights[job] = Flight(job, client, st.version, t, steps, down, st.residue)
        self._in_flight(st).start(client)
        hooks.log(t, "dispatch", client=client, version=st.version, job=job)
        kind, share = ("lost", lost_at) if lost_at is not None else ("done", 1.0)
        end = self.clock.compute_end(client, job, steps, down, (t, st.residue), share)
        if end is not None:  # else the clock queues it when the job's reply comes in (`Clock.wait`)
            st.queue.push(end[0], kind, priority(kind, client), residue=end[1], job=job)
