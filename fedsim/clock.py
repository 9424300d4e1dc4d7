"""The virtual clock: a discrete-event queue ordered by (time, priority, sequence number).

Time is kept in integer ticks (1 ns of virtual time) so that window boundaries and
arrivals never get misclassified by float accumulation; `to_ticks` is the only rounding.
Nobody sleeps: popping an event moves `now` to its time.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from .errors import FedsimError

TICKS_PER_SECOND = 10**9


def to_ticks(seconds: float) -> int:
    """Converts virtual seconds to integer ticks (rounded to the nearest tick).

    Raises FedsimError for a non-finite duration (e.g. a near-zero bandwidth in `system`).
    """
    value = float(seconds) * TICKS_PER_SECOND
    if value != value or value in (float("inf"), float("-inf")):
        raise FedsimError(f"a virtual duration is not finite ({seconds}); check the system.* values")
    return int(round(value))


def to_seconds(ticks: int) -> float:
    """Converts integer ticks to virtual seconds."""
    return ticks / TICKS_PER_SECOND


@dataclass(order=True, frozen=True)
class Event:
    """A scheduled happening; ordered by time, then priority (lower first), then insertion."""

    time: int
    priority: int
    seq: int
    kind: str = field(compare=False)
    data: dict[str, Any] = field(compare=False, default_factory=dict)


class EventQueue:
    """A heap of Events with a monotone `now`; ties are broken by priority then sequence."""

    def __init__(self, now: int = 0, seq: int = 0):
        self.now = now
        self._seq = seq
        self._heap: list[Event] = []

    def push(self, time: int, kind: str, priority: int = 0, **data: Any) -> Event:
        """Schedules an event at tick `time` (not before now) and returns it."""
        if time < self.now:
            raise ValueError(f"cannot schedule {kind!r} at {time} before now={self.now}")
        ev = Event(int(time), priority, self._seq, kind, data)
        self._seq += 1
        heapq.heappush(self._heap, ev)
        return ev

    def pop(self) -> Event:
        """Removes the earliest event, advances `now` to its time and returns it."""
        ev = heapq.heappop(self._heap)
        self.now = ev.time
        return ev

    def peek(self) -> Event | None:
        """Returns the earliest event without removing it (None when empty)."""
        return self._heap[0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def snapshot(self) -> dict[str, Any]:
        """Returns the queue as plain data (for checkpoints)."""
        return {
            "now": self.now,
            "seq": self._seq,
            "events": [(e.time, e.priority, e.seq, e.kind, dict(e.data)) for e in sorted(self._heap)],
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> "EventQueue":
        """Rebuilds a queue from `snapshot()` output."""
        q = cls(now=int(snap["now"]), seq=int(snap["seq"]))
        q._heap = [Event(int(t), int(p), int(s), k, dict(d)) for t, p, s, k, d in snap["events"]]
        heapq.heapify(q._heap)
        return q
