"""Protocols whose step is one whole round: plan it first, so its end is known before it is applied.

A synchronous round changes the model only when it ends, and when it ends depends on what
its jobs send (their uplink sizes). To tell the runner when the next step takes effect
(`next_time`, used by time-based evaluation), the round is *planned* — clients sampled,
jobs run, arrivals and end computed — without touching the state; `step` then applies the
plan. The plan is a pure function of the state, so it is cached for the state it was made
from and simply made again after a resume.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

from .base import Protocol, ProtocolState, RunContext

FINISH, WAIT = "finish", "wait"  # plans that perform no round: the run ends; no client is available


class RoundProtocol(Protocol):
    """A protocol that plans a round (`plan`) and then applies it (`apply`)."""

    _planned: tuple[tuple[int, ...], Any] | None = None
    state_kept_while_waiting = True  # `plan` runs the jobs without touching the state

    @abstractmethod
    def plan(self, ctx: RunContext, state: ProtocolState) -> Any:
        """Returns the next round's plan, made from `state` without changing it."""

    @abstractmethod
    def apply(self, ctx: RunContext, state: ProtocolState, plan: Any) -> ProtocolState:
        """Applies a plan made by `plan` from this state; returns the state."""

    @abstractmethod
    def plan_end(self, plan: Any) -> int | None:
        """Returns the tick at which the planned round ends (None: no round is performed)."""

    def _plan_for(self, ctx: RunContext, state: ProtocolState) -> Any:
        key = (id(state), state.rounds, state.time, state.next_job, int(state.finished))
        if self._planned is None or self._planned[0] != key:
            self._planned = (key, self.plan(ctx, state))
        return self._planned[1]

    def step(self, ctx: RunContext, state: ProtocolState) -> ProtocolState:
        plan = self._plan_for(ctx, state)
        self._planned = None
        return self.apply(ctx, state, plan)

    def next_time(self, ctx: RunContext, state: ProtocolState) -> int | None:
        """Returns when the next round ends: its model takes effect then (None: no round)."""
        return self.plan_end(self._plan_for(ctx, state))


__all__ = ["FINISH", "WAIT", "RoundProtocol"]
