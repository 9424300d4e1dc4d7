"""What fedsim's two Flower ServerApp protocols share: the node link and the wall clock.

A Flower protocol is a fedsim `Protocol` whose jobs travel to SuperNodes instead of an
executor and whose clock is the wall clock (seconds since the run started, kept in
fedsim's integer ticks), so `fedsim.runner` drives it unchanged: evaluation on the test
set, metrics.jsonl, events.jsonl, summary and final model.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import yaml
from flwr.serverapp import Grid

from ..clock import to_ticks
from ..executors.base import JobResult
from ..protocols.base import Protocol, ProtocolState, RunContext, check_all_finite
from ..strategy import Msg, Tensor
from .link import NodeLink
from .settings import FlowerSettings


class FlowerProtocol(Protocol):
    """Base of the sync and async Flower protocols (see the module docstring)."""

    requires = "server"
    clock_runs_alone = True  # the wall clock

    def __init__(self, grid: Grid, settings: FlowerSettings):
        self.grid = grid
        self.settings = settings
        self.started = time.monotonic()

    def setup(self, ctx: RunContext) -> None:
        """Connects to the SuperNodes: one per fedsim client, found by its partition-id."""
        config = yaml.safe_dump(ctx.config.resolved(), sort_keys=False)
        self.link = NodeLink(self.grid, config, ctx.task.layout, self.settings.poll_interval)
        self.link.connect(ctx.num_clients, self.settings.node_timeout)
        self.started = time.monotonic()

    def now(self) -> int:
        """Returns wall-clock ticks since the run started."""
        return to_ticks(time.monotonic() - self.started)

    def deadline(self, seconds: float) -> float:
        """Returns the monotonic clock reading `seconds` from now."""
        return time.monotonic() + seconds

    def eval_params(self, ctx: RunContext, state: Any) -> Tensor:
        return ctx.strategy.params(state.server)


def to_msgs(results: Sequence[JobResult], weights: Sequence[float], staleness: Sequence[int],
            bases: Sequence[Tensor], state: ProtocolState) -> list[Msg]:
    """Returns the Msgs of one aggregation (after checking every update is finite)."""
    check_all_finite(results, state.rounds, state.time)
    return [
        Msg(r.client, r.output.update, w, s, r.num_samples, r.num_steps, base, r.output.extras)
        for r, w, s, base in zip(results, weights, staleness, bases)
    ]

