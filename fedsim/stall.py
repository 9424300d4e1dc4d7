"""Runs that cannot end: refused at set-up when provable, stopped at run time otherwise.

A run ends by `run.rounds` (rounds completed) and/or `run.time_budget` (the virtual clock).
Some configs never get there: every job takes no virtual time, so the clock stays put;
every job is lost, so no round completes; no client is ever available again.

At set-up (`check_horizon`, only with a time budget):

* every client's step time is 0 and the link takes no time, while only the budget can stop
  the run: refused;
* the budget ends before the fastest client could finish its first job's local steps
  (nothing would be trained): refused. A budget that ends before the first round for other
  reasons (transfers, a slow cohort) is not known until the run ends: `warn_if_nothing_done`.

Neither applies to a protocol whose clock moves by itself (`Protocol.clock_runs_alone`: a
Flower protocol's wall clock, FedFix windows that the clients wait for).

At run time (`StallWatch`, after every step of the protocol):

* **no progress**: `run.stall_jobs_per_client` × clients jobs started without the run getting
  closer to its end — no round completed (when `run.rounds` is set) and the clock did not
  move (when `run.time_budget` is set);
* **idle**: `run.max_idle_time` virtual seconds without a job started or a round completed
  (no client is available, or none comes back).

Either stops the run with `NoProgressError` (exit status 4). The watch's marks live in the
driver's checkpointed state, so a resumed run stops where the uninterrupted one would.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .clock import to_seconds, to_ticks
from .config.load import Config
from .errors import ConfigError
from .system.population import Population


def check_horizon(config: Config, population: Population, samples: np.ndarray, model_bytes: int) -> None:
    """Raises ConfigError when `run.time_budget` can never be reached (no job takes virtual
    time) or ends before any client can finish its first job's local steps. `samples` holds
    each client's training samples; `model_bytes` the size of one model on the wire. Only for
    protocols whose clock is moved by the jobs alone (`Protocol.clock_runs_alone` is False)."""
    run = config.run
    if run.time_budget is None:
        return
    clients = np.arange(population.num_clients)
    step = population.step_time(clients)
    if run.rounds is None and not step.any():
        sizes = np.full(len(clients), model_bytes)
        if not np.asarray(population.link.transfer_time(clients, sizes, sizes)).any():
            raise ConfigError(
                "system.compute",
                f"every job takes 0 virtual seconds (step time 0, no transfer time), so the clock never "
                f"reaches run.time_budget={run.time_budget:g}; give the clients a step time > 0 or stop by run.rounds",
            )
    if population.jitter != "none":  # a job's random factor has no lower bound above 0
        return
    local = config.local
    least_steps = np.where(samples > 0, local.steps or local.epochs, 0)  # a job with data takes ≥ this many steps
    fastest = float(np.min(step * least_steps)) if len(clients) else 0.0
    if to_ticks(run.time_budget) < to_ticks(fastest):
        raise ConfigError(
            "run.time_budget",
            f"{run.time_budget:g} s ends before any client can finish its first job's local steps "
            f"(the fastest takes {fastest:.6g} s): nothing would be trained",
        )


def warn_if_nothing_done(config: Config, rounds: int, aggregations: int, time: int) -> None:
    """Warns when a run ended (normally) before its first round or aggregation: e.g. a time
    budget shorter than the first round, which `check_horizon` cannot prove at set-up."""
    if rounds == 0 and aggregations == 0:
        budget = config.run.time_budget
        why = f" (run.time_budget={budget:g} s)" if budget is not None else ""
        warnings.warn(f"the run ended at virtual time {to_seconds(time):.6g} s{why} before its first round "
                      "completed: nothing was aggregated", stacklevel=2)


class StallWatch:
    """Tells when a run has stopped moving toward its end (module docstring).

    `marks` is the driver's checkpointed dict in which the watch keeps what it has seen.
    """

    def __init__(self, config: Config, num_clients: int, marks: dict[str, Any]):
        run = config.run
        self.by_rounds = run.rounds is not None
        self.by_time = run.time_budget is not None
        self.per_client = run.stall_jobs_per_client
        self.max_jobs = None if run.stall_jobs_per_client is None else run.stall_jobs_per_client * num_clients
        self.max_idle = run.max_idle_time
        self.marks = marks

    def start(self, rounds: int, time: int, jobs: int) -> None:
        """Marks the starting point (a resumed run keeps its restored marks)."""
        if not self.marks:
            self.marks.update(rounds=rounds, time=time, jobs=jobs, busy=time, seen_jobs=jobs, seen_rounds=rounds)

    def check(self, rounds: int, time: int, jobs: int) -> str | None:
        """Updates the marks with the state after a step (rounds completed, clock in ticks,
        jobs started so far); returns why the run is stalled, or None."""
        m = self.marks
        if (self.by_rounds and rounds > m["rounds"]) or (self.by_time and time > m["time"]):
            m.update(rounds=rounds, time=time, jobs=jobs)
        elif self.max_jobs is not None and jobs - m["jobs"] >= self.max_jobs:
            return self._no_progress(jobs - m["jobs"])
        if jobs != m["seen_jobs"] or rounds != m["seen_rounds"]:
            m.update(busy=time, seen_jobs=jobs, seen_rounds=rounds)
        elif self.max_idle is not None and time - m["busy"] >= to_ticks(self.max_idle):
            return (f"no job started and no round completed from virtual time {to_seconds(m['busy']):.6g} s to "
                    f"{to_seconds(time):.6g} s: is no client available any more? (run.max_idle_time={self.max_idle:g} s)")
        return None

    def _no_progress(self, jobs: int) -> str:
        m = self.marks
        since = f"since round {m['rounds']} at virtual time {to_seconds(m['time']):.6g} s"
        knob = f"(run.stall_jobs_per_client={self.per_client:g})"
        if self.by_rounds and self.by_time:
            return f"{jobs} jobs started {since} without completing a round or moving the clock {knob}"
        if self.by_rounds:
            return f"{jobs} jobs started {since} without completing a round: are all jobs lost or discarded? {knob}"
        return (f"{jobs} jobs started {since} without moving the virtual clock: jobs take no virtual time, so "
                f"run.time_budget is never reached {knob}")


__all__ = ["StallWatch", "check_horizon", "warn_if_nothing_done"]
