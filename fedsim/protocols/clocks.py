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

Instants are (tick, residue) pairs (`fedsim.clock`): under virtual time a job's end is its
exact start plus its duration, rounded to a tick once (`fedsim.clock.later`), so a chain of
jobs ends where the exact sum of its durations falls. Under wall time every instant is an
observed tick and its residue is 0.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from ..clock import later, later_each, to_seconds, to_ticks
from ..contributions import Contributions
from ..errors import FedsimError
from ..executors.base import Executor, Job
from ..executors.job_batch import JobBatch
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
    end_residue: float = 0.0  # exact end − end, in ticks
    cut: int | None = None  # the deadline's tick (None: no deadline)


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

    @property
    def always_available(self) -> bool:
        """True when `available` returns every client it is given, at every tick."""
        return False

    @abstractmethod
    def run_round(self, executor: Executor, jobs: Sequence[Job], t0: int, deadline: float | None,
                  bytes_down: int, residue: float = 0.0) -> RoundOutcome:
        """Runs a synchronous round's jobs (each sent `bytes_down` bytes) from tick t0
        (`residue` ticks before its exact start); results later than `deadline` seconds after
        the start are stragglers (None: wait for every job). Returns what happened."""

    # ---- the asynchronous schedule's hooks ----------------------------------------------------
    @abstractmethod
    def lost_at(self, client: int, job: int) -> float | None:
        """Returns the fraction of its compute time after which a job disappears, or None if it is not lost."""

    @abstractmethod
    def compute_end(self, client: int, job: int, steps: int, bytes_down: int, start: tuple[int, float],
                    share: float = 1.0) -> tuple[int, float] | None:
        """Returns the instant (tick, residue) at which the share `share` of the compute of a
        job dispatched at the instant `start` is done (None: the clock learns it by `wait`)."""

    @abstractmethod
    def arrival(self, flight: "Flight", bytes_up: int, now: tuple[int, float]) -> tuple[int, float]:
        """Returns the instant (tick, residue) at which a job whose result was fetched at the
        instant `now` (sending `bytes_up`) arrives."""

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

    @property
    def always_available(self) -> bool:
        return bool(self.population.availability.always)

    def next_availability_change(self, t: int) -> float:
        return self.population.next_availability_change(to_seconds(t))

    def run_round(self, executor: Executor, jobs: Sequence[Job], t0: int, deadline: float | None,
                  bytes_down: int, residue: float = 0.0) -> RoundOutcome:
        pop, m = self.population, len(jobs)
        jobs = JobBatch.of(jobs)
        clients, job_ids = jobs.clients, jobs.job_ids
        lost, lost_at = pop.drops(clients, job_ids)
        ran = np.flatnonzero(~lost)
        results = executor.run(jobs if len(ran) == m else jobs.take(ran))
        # a client whose code raised (executor.on_client_error='drop') is lost when its job would end
        row = np.full(m, -1, dtype=np.int64)  # row[i]: job i's row in `results`
        row[np.searchsorted(job_ids, results.jobs)] = np.arange(len(results))
        failed = np.zeros(m, dtype=bool)
        failed[ran] = row[ran] < 0
        ups = np.zeros(m, dtype=np.int64)
        ups[row >= 0] = results.uplink_bytes()[row[row >= 0]]
        lost, lost_at = lost | failed, np.where(failed, 1.0, lost_at)
        durations = pop.job_seconds(clients, jobs.num_steps, np.full(m, bytes_down), ups, job_ids)
        timing = time_round(t0, residue, clients, durations, lost, lost_at, deadline)
        return RoundOutcome(results.take(row[timing.on_time]), timing.on_time_at, timing.late, timing.losses,
                            timing.end, timing.end_residue, timing.cut)

    def lost_at(self, client: int, job: int) -> float | None:
        if self.population.dropout.never:
            return None
        lost, at = self.population.drops(np.array([client]), np.array([job]))
        return float(at[0]) if lost[0] else None

    def compute_end(self, client: int, job: int, steps: int, bytes_down: int, start: tuple[int, float],
                    share: float = 1.0) -> tuple[int, float]:
        seconds = self.population.job_seconds_one(client, steps, bytes_down, 0, job)
        return later(*start, share * seconds)

    def arrival(self, flight: "Flight", bytes_up: int, now: tuple[int, float]) -> tuple[int, float]:
        f = flight
        total = self.population.job_seconds_one(f.client, f.steps, f.bytes_down, bytes_up, f.job)
        return max(later(f.start, f.start_residue, total), now)


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
        if last > self.now():  # a resumed run: its time goes on from where its checkpoint stopped
            self.started = time.monotonic() - to_seconds(last)
        return max(last, self.now())

    def available(self, clients: np.ndarray, t: int) -> np.ndarray:
        return np.asarray(clients)

    always_available = True  # type: ignore[assignment]  # every reachable client takes jobs

    def next_availability_change(self, t: int) -> float:
        return math.inf

    def run_round(self, executor: Executor, jobs: Sequence[Job], t0: int, deadline: float | None,
                  bytes_down: int, residue: float = 0.0) -> RoundOutcome:
        cut = t0 + to_ticks(deadline) if deadline is not None else None
        jobs = list(jobs)  # a JobBatch builds its jobs when iterated: once
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
                            sorted(losses, key=lambda x: x[1]), max(end, t0), 0.0, cut)

    def lost_at(self, client: int, job: int) -> float | None:
        return None

    def compute_end(self, client: int, job: int, steps: int, bytes_down: int, start: tuple[int, float],
                    share: float = 1.0) -> None:
        return None

    def arrival(self, flight: "Flight", bytes_up: int, now: tuple[int, float]) -> tuple[int, float]:
        return now

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


__all__ = ["Clock", "RoundOutcome", "RoundTiming", "VirtualClock", "WallClock", "time_round"]
