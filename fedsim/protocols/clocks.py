"""The two clocks a protocol runs on: virtual time (simulation) or wall time (a deployment).

A protocol never asks how long a job takes, whether a client is there or whether a job is
lost: it asks its clock. The same protocol code therefore runs in both worlds.

* `VirtualClock` — simulation. Durations, availability and dropout come from the
  population's behaviour models (`fedsim.system`); the executor runs a job as soon as it is
  submitted, and time jumps from event to event (nobody sleeps).
* `WallClock` — a deployment. Jobs run on remote nodes through an executor that can report
  finished jobs (`Executor.poll`, e.g. Flower SuperNodes); a job arrives when its reply is
  received, every client the executor reaches is available, and a job is lost only when its
  node goes away. Time is seconds since the run started, in the same integer ticks.

Two entry points serve the protocols: `run_round` (a synchronous round: run the jobs, say
which arrived by the deadline and when) and the event hooks of the asynchronous schedule
(`fedsim.protocols.async_engine`): `lost_at`, `compute_end`, `arrival` and `wait`.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..clock import to_seconds, to_ticks
from ..contributions import Contributions
from ..errors import FedsimError
from ..executors.base import Executor, Job
from ..system.population import Population

if TYPE_CHECKING:
    from .async_engine import Flight, ScheduleState


@dataclass
class RoundOutcome:
    """What happened to a synchronous round's jobs (ticks)."""

    results: Contributions  # the jobs that arrived by the deadline, by arrival (then client id)
    arrivals: np.ndarray  # their arrival ticks
    late: list[tuple[int, int]]  # (arrival, client) of the jobs that arrived after the deadline (stragglers)
    losses: list[tuple[int, int]]  # (when lost, client), in job order
    end: int  # the last arrival or loss, cut at the deadline; the round's start if nothing happened


class Clock(ABC):
    """Where time, availability and job durations come from; see the module docstring."""

    virtual: bool = True
    population: Population | None = None  # the behaviour models (virtual time only)

    @abstractmethod
    def start(self, last: int) -> int:
        """Returns the tick at which the next round starts, the last one having ended at `last`."""

    @abstractmethod
    def available(self, clients: np.ndarray, t: int) -> np.ndarray:
        """Returns the ids among `clients` that can take a job at tick t."""

    @abstractmethod
    def next_availability_change(self, t: int) -> float:
        """Returns the next time (seconds) at which availability may change (inf: never)."""

    @abstractmethod
    def run_round(self, executor: Executor, jobs: Sequence[Job], t0: int, cut: int | None,
                  bytes_down: int) -> RoundOutcome:
        """Runs a synchronous round's jobs (each sent `bytes_down` bytes) from tick t0, with
        the deadline `cut` (None: wait for every job); returns what happened."""

    # ---- the asynchronous schedule's hooks ----------------------------------------------------
    @abstractmethod
    def lost_at(self, client: int, job: int) -> float | None:
        """Returns the fraction of its compute time after which a job disappears, or None if it is not lost."""

    @abstractmethod
    def compute_end(self, client: int, job: int, steps: int, bytes_down: int, t: int) -> int | None:
        """Returns the tick at which a job dispatched at t has computed (None: the clock
        learns it by `wait`)."""

    @abstractmethod
    def arrival(self, flight: "Flight", bytes_up: int, t: int) -> int:
        """Returns the tick at which a job whose result was fetched at t (sending `bytes_up`) arrives."""

    def wait(self, st: "ScheduleState", executor: Executor, priority: Any) -> None:
        """Blocks until the next event is due, queueing the jobs that finished meanwhile."""


class VirtualClock(Clock):
    """Simulated time: see the module docstring."""

    virtual = True

    def __init__(self, population: Population):
        self.population = population

    def start(self, last: int) -> int:
        return last

    def available(self, clients: np.ndarray, t: int) -> np.ndarray:
        return self.population.available(clients, to_seconds(t))

    def next_availability_change(self, t: int) -> float:
        return self.population.next_availability_change(to_seconds(t))

    def run_round(self, executor: Executor, jobs: Sequence[Job], t0: int, cut: int | None,
                  bytes_down: int) -> RoundOutcome:
        pop, m = self.population, len(jobs)
        clients = np.fromiter((j.client for j in jobs), np.int64, m)
        job_ids = np.fromiter((j.job_id for j in jobs), np.int64, m)
        lost, lost_at = pop.drops(clients, job_ids)
        ran = np.flatnonzero(~lost)
        results = executor.run([jobs[i] for i in ran.tolist()])
        # a client whose code raised (executor.on_client_error='drop') is lost when its job would end
        row = np.full(m, -1, dtype=np.int64)  # row[i]: job i's row in `results`
        row[np.searchsorted(job_ids, results.jobs)] = np.arange(len(results))
        failed = np.zeros(m, dtype=bool)
        failed[ran] = row[ran] < 0
        ups = np.zeros(m, dtype=np.int64)
        ups[row >= 0] = results.uplink_bytes()[row[row >= 0]]
        lost, lost_at = lost | failed, np.where(failed, 1.0, lost_at)
        durations = pop.job_ticks(clients, [j.num_steps for j in jobs], np.full(m, bytes_down), ups, job_ids)
        on_time, arrivals, late, losses, end = time_round(t0, clients, durations, lost, lost_at, cut)
        return RoundOutcome(results.take(row[on_time]), arrivals, late, losses, end)

    def lost_at(self, client: int, job: int) -> float | None:
        lost, at = self.population.drops(np.array([client]), np.array([job]))
        return float(at[0]) if lost[0] else None

    def compute_end(self, client: int, job: int, steps: int, bytes_down: int, t: int) -> int:
        return t + self.population.job_ticks([client], [steps], [bytes_down], [0], [job])[0]

    def arrival(self, flight: "Flight", bytes_up: int, t: int) -> int:
        f = flight
        total = self.population.job_ticks([f.client], [f.steps], [f.bytes_down], [bytes_up], [f.job])[0]
        return max(f.start + total, t)


def time_round(t0: int, clients: np.ndarray, durations: np.ndarray, lost: np.ndarray, lost_at: np.ndarray,
               cut: int | None) -> tuple[np.ndarray, np.ndarray, list, list, int]:
    """Times a round that starts at `t0`: job i of `clients[i]` takes `durations[i]` ticks, or,
    when `lost[i]`, disappears after the fraction `lost_at[i]` of it (rounded half to even);
    `cut` is the deadline's tick (None: no deadline). Returns (the jobs that arrive by the
    deadline — indices, by arrival then client —, their arrival ticks, (arrival, client) of
    the late ones in the same order, (when lost, client) of the lost ones in job order, the
    round's end: its last arrival or loss, cut at the deadline, t0 if nothing happens)."""
    durations = np.asarray(durations, dtype=np.int64)
    came = np.flatnonzero(~lost)
    arrive = t0 + durations[came]
    order = np.lexsort((clients[came], arrive))  # by arrival, then client
    came, arrive = came[order], arrive[order]
    gone = np.flatnonzero(lost)
    lost_t = t0 + np.round(lost_at[gone] * durations[gone]).astype(np.int64)
    in_time = np.ones(len(came), dtype=bool) if cut is None else arrive <= cut
    late = list(zip(arrive[~in_time].tolist(), clients[came[~in_time]].tolist()))
    losses = list(zip(lost_t.tolist(), clients[gone].tolist()))
    end = max(int(arrive.max(initial=t0)), int(lost_t.max(initial=t0)), t0)
    return came[in_time], arrive[in_time], late, losses, end if cut is None else min(end, cut)


class WallClock(Clock):
    """Real time: see the module docstring. `reply_timeout` (seconds) bounds how long a
    round without a deadline, or an asynchronous run with nothing else to wait for, waits
    for a reply before the run stops with an error."""

    virtual = False

    def __init__(self, reply_timeout: float = 3600.0):
        self.reply_timeout = reply_timeout
        self.started = time.monotonic()

    def restart(self) -> None:
        """Starts counting from now (called once the nodes are connected)."""
        self.started = time.monotonic()

    def now(self) -> int:
        """Returns wall-clock ticks since the run started."""
        return to_ticks(time.monotonic() - self.started)

    def _monotonic(self, tick: int) -> float:
        return self.started + to_seconds(tick)

    def start(self, last: int) -> int:
        return max(last, self.now())

    def available(self, clients: np.ndarray, t: int) -> np.ndarray:
        return np.asarray(clients)

    def next_availability_change(self, t: int) -> float:
        return math.inf

    def run_round(self, executor: Executor, jobs: Sequence[Job], t0: int, cut: int | None,
                  bytes_down: int) -> RoundOutcome:
        for job in jobs:
            executor.submit(job)
        pending = {j.job_id: j for j in jobs}
        limit = cut if cut is not None else t0 + to_ticks(self.reply_timeout)
        arrived: list[tuple[int, int, Contributions]] = []
        losses: list[tuple[int, int]] = []
        while pending and self.now() < limit:
            for job_id in executor.poll(self._monotonic(limit)):
                t, job = self.now(), pending.pop(job_id)
                got = executor.result(job_id)
                if len(got):
                    arrived.append((t, job.client, got))
                else:
                    losses.append((t, job.client))
        if pending and cut is None:
            raise FedsimError(f"no reply from client(s) {sorted(j.client for j in pending.values())} within "
                              f"reply-timeout={self.reply_timeout:g} s")
        end = self.now() if not pending else limit
        for job_id in pending:
            executor.discard(job_id)
        late = [(end, j.client) for j in pending.values()]
        arrived.sort(key=lambda a: (a[0], a[1]))
        results = Contributions.concat([c for _, _, c in arrived])
        return RoundOutcome(results, np.array([a[0] for a in arrived], dtype=np.int64), late,
                            sorted(losses, key=lambda x: x[1]), max(end, t0))

    def lost_at(self, client: int, job: int) -> float | None:
        return None

    def compute_end(self, client: int, job: int, steps: int, bytes_down: int, t: int) -> None:
        return None

    def arrival(self, flight: "Flight", bytes_up: int, t: int) -> int:
        return t

    def wait(self, st: "ScheduleState", executor: Executor, priority: Any) -> None:
        while True:
            nxt = st.queue.peek()
            if nxt is not None and nxt.time <= self.now():
                return
            if not st.flights:
                return  # nothing will arrive: the next timer (or the end) is all there is
            until = nxt.time if nxt is not None else self.now() + to_ticks(self.reply_timeout)
            done = executor.poll(self._monotonic(until))
            now = max(self.now(), st.queue.now)
            for job in sorted(done):
                st.queue.push(now, "done", priority("done", st.flights[job].client), job=job)
            if done:
                return
            if nxt is None and self.now() >= until:
                busy = sorted(f.client for f in st.flights.values())
                raise FedsimError(f"no reply from client(s) {busy} within reply-timeout={self.reply_timeout:g} s")


__all__ = ["Clock", "RoundOutcome", "VirtualClock", "WallClock", "time_round"]
