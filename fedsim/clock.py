"""The virtual clock: a discrete-event queue ordered by (time, priority, sequence number).

Time is an integer number of ticks (1 ns of virtual time). Events are ordered, compared with
window boundaries, deadlines and the budget, and reported on that grid, so two things that
happen at the same instant fall on the same tick and their order is the protocols' tie
rule, never float noise.

Durations come in float seconds and are not rounded one by one. Each time also carries its
*residue*, its distance to its tick (a float, in ticks, at most ½), and a job that starts
at (tick, residue) ends at the tick nearest to start + duration, computed with the residue
(`later`): a time reached through a chain of jobs is the sum of their durations, rounded
once. Rounding each duration instead lets the error grow by up to ½ tick per job: 720 jobs
of 5/9 s (555555555.6 ns, rounded to 555555556) would end 320 ns after 400 s, behind a
client arriving at exactly 400 s, and exact ties would be ordered by that drift instead of
the tie rule.

What remains is the float error of the durations themselves and of one addition per job,
about 1e-16 of the elapsed time (measured: under 0.1 ns after 10^6 virtual seconds of
Fraboni et al.'s F-80 profile). So a time is its exact value rounded to the nearest tick,
and exact ties and window boundaries, which fall on ticks, are met exactly, unless an
exact time lies within that error of a half tick. Exact rational time would need rational
durations from every system model (a plugin's or a random draw's are floats), and a float
residue keeps timing vectorised: a synchronous round of a million clients is timed in one
numpy expression (`later_each`). States checkpoint the residue with the tick, so a resumed
run times every job as the uninterrupted one. Nobody sleeps: popping an event moves `now`
to its time.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FedsimError

TICKS_PER_SECOND = 10**9


def to_ticks(seconds: float) -> int:
    """Converts an instant or a span given in virtual seconds (a window, a deadline, the
    budget) to the nearest tick; times reached by adding durations go through `later`.

    Raises FedsimError for a non-finite value (e.g. a near-zero bandwidth in `system`).
    """
    return later(0, 0.0, seconds)[0]


def tick_after(tick: int, seconds: float) -> int:
    """Returns the tick at which to look again for a change that happens at `seconds` (an
    availability slot's boundary, computed in float seconds after the instant of `tick`):
    its nearest tick, but at least tick + 1. A boundary k·period can lie within half a tick
    of `tick` and round back onto it; a wake-up scheduled there would see the old slot again,
    and again, at the same instant.
    """
    return max(to_ticks(seconds), tick + 1)


def later(tick: int, residue: float, seconds: float) -> tuple[int, float]:
    """Returns the time `seconds` after the time (tick, residue): its nearest tick (half to
    even) and its new residue (exact time − tick, in ticks, within [−½, ½]).

    Raises FedsimError for a non-finite duration.
    """
    offset = residue + float(seconds) * TICKS_PER_SECOND
    if not math.isfinite(offset):
        raise _not_finite(seconds)
    whole = round(offset)
    return tick + whole, offset - whole


def later_each(tick: int, residue: float, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`later` for many durations from one start, with the same arithmetic: returns
    (int64 ticks, float residues)."""
    seconds = np.asarray(seconds, dtype=np.float64)
    offset = residue + seconds * TICKS_PER_SECOND
    if not np.isfinite(offset).all():
        raise _not_finite(seconds[~np.isfinite(offset)][0])
    whole = np.rint(offset)
    return tick + whole.astype(np.int64), offset - whole


def _not_finite(seconds: float) -> FedsimError:
    return FedsimError(f"a virtual duration is not finite ({seconds}); check the system.* values")


def to_seconds(ticks: int) -> float:
    """Converts integer ticks to virtual seconds."""
    return ticks / TICKS_PER_SECOND


@dataclass(order=True, frozen=True)
class Event:
    """A scheduled happening; ordered by time (ticks), then priority (lower first), then
    insertion. `residue` is its exact time − `time`, in ticks (see the module docstring)."""

    time: int
    priority: int
    seq: int
    kind: str = field(compare=False)
    data: dict[str, Any] = field(compare=False, default_factory=dict)
    residue: float = field(compare=False, default=0.0)


class EventQueue:
    """A heap of Events with a monotone `now` (ticks); ties are broken by priority then sequence."""

    def __init__(self, now: int = 0, seq: int = 0):
        self.now = now
        self._seq = seq
        # (time, priority, seq, event): tuples compare in C, ~10x cheaper than Event's generated
        # ordering, and seq is unique, so the event itself is never compared
        self._heap: list[tuple[int, int, int, Event]] = []

    def push(self, time: int, kind: str, priority: int = 0, *, residue: float = 0.0, **data: Any) -> Event:
        """Schedules an event at tick `time` (not before now), `residue` ticks from its exact
        time (as `later` returns them), and returns it."""
        if time < self.now:
            raise ValueError(f"cannot schedule {kind!r} at {time} before now={self.now}")
        ev = Event(int(time), priority, self._seq, kind, data, float(residue))
        self._seq += 1
        heapq.heappush(self._heap, (ev.time, ev.priority, ev.seq, ev))
        return ev

    def pop(self) -> Event:
        """Removes the earliest event, advances `now` to its time and returns it."""
        ev = heapq.heappop(self._heap)[3]
        self.now = ev.time
        return ev

    def peek(self) -> Event | None:
        """Returns the earliest event without removing it (None when empty)."""
        return self._heap[0][3] if self._heap else None

    def pending(self, kind: str) -> list[Event]:
        """Returns the scheduled events of one kind, in the order they will be popped."""
        return [entry[3] for entry in sorted(self._heap) if entry[3].kind == kind]

    def __len__(self) -> int:
        return len(self._heap)

    def snapshot(self) -> dict[str, Any]:
        """Returns the queue as plain data (for checkpoints)."""
        return {
            "now": self.now,
            "seq": self._seq,
            "events": [(e.time, e.priority, e.seq, e.kind, dict(e.data), e.residue) for *_, e in sorted(self._heap)],
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> "EventQueue":
        """Rebuilds a queue from `snapshot()` output (events saved without a residue have none)."""
        q = cls(now=int(snap["now"]), seq=int(snap["seq"]))
        events = [Event(int(t), int(p), int(s), k, dict(d), float(r[0]) if r else 0.0)
                  for t, p, s, k, d, *r in snap["events"]]
        q._heap = [(e.time, e.priority, e.seq, e) for e in events]
        heapq.heapify(q._heap)
        return q
