"""Synchronous rounds on a Flower deployment, driven by the strategy's server part.

Round r is fedsim's sync round (`fedsim.protocols.sync`) with the SuperNodes as executor:
the same keyed cohort draw among all clients, the same job ids (so the same batches), the
same aggregation weights, then ``combine``. Replies are folded in client order, so the
result does not depend on the order in which they come back. The config's
``protocol.deadline`` is wall-clock seconds here: later replies are stragglers, discarded
with their client state. A job whose node went away is counted as dropped. The system
models (simulated speeds, availability, dropout) play no part: the deployment is real.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..clock import to_seconds
from ..comm import nbytes
from ..errors import ConfigError
from ..protocols.base import RunContext
from ..protocols.sync import SyncProtocol, SyncState
from ..protocols.weighting import aggregation_weights, importance
from ..rng import numpy_rng
from ..strategy import CombineContext
from .messages import TrainTask
from .protocol import FlowerProtocol, to_msgs


@dataclass
class FlowerSyncState(SyncState):
    """SyncState plus, per client, the last job the server aggregated (its node commits that state)."""

    accepted: dict[int, int] = field(default_factory=dict)


class FlowerSync(FlowerProtocol):
    """See the module docstring."""

    def setup(self, ctx: RunContext) -> None:
        sync = ctx.config.protocol.build()
        if not isinstance(sync, SyncProtocol):
            raise ConfigError("protocol.name", f"Flower mode 'sync' runs protocol 'sync', not {ctx.config.protocol.name!r}")
        self.sync = sync
        self.cohort = sync.cohort_size(ctx.num_clients)
        self.p = importance(ctx.data.samples_per_client(), sync.client_weights)
        super().setup(ctx)

    def init(self, ctx: RunContext) -> FlowerSyncState:
        return FlowerSyncState(server=ctx.strategy.init(ctx.initial_params))

    def step(self, ctx: RunContext, state: FlowerSyncState) -> FlowerSyncState:
        if ctx.out_of_rounds(state) or self.now() > ctx.budget_ticks():
            state.finished = True
            return state
        n, m = ctx.num_clients, self.cohort
        cohort = np.sort(numpy_rng(ctx.seed, "sample", state.rounds).choice(np.arange(n), m, replace=False))
        payload = ctx.strategy.publish(state.server)
        tasks = [TrainTask(int(c), state.next_job + i, state.version, state.accepted.get(int(c), -1), payload)
                 for i, c in enumerate(cohort)]
        self.link.dispatch(tasks, group=str(state.rounds))
        for t in tasks:
            ctx.log(self.now(), "dispatch", client=t.client, version=state.version, job=t.job_id)

        wait = self.sync.deadline if self.sync.deadline is not None else self.settings.reply_timeout
        until, results, lost = self.deadline(wait), [], []
        while self.link.in_flight:
            got, gone = self.link.wait(until)
            results += got
            lost += gone
            if not (got or gone):
                break
        late = {d.job_id for d in self.link.in_flight.values()}
        self.link.abandon(late)
        end = self.now()

        results.sort(key=lambda r: r.client)
        weights = aggregation_weights(self.sync.weighting, [r.client for r in results],
                                      [r.num_samples for r in results], self.p, [m / n] * len(results))
        msgs = to_msgs(results, weights, [0] * len(results), [payload.params] * len(results), state)
        state.server = ctx.strategy.combine(state.server, msgs, CombineContext(n, state.version, to_seconds(end)))
        for r in results:
            state.accepted[r.client] = r.job_id
            ctx.log(end, "arrival", client=r.client, version=state.version, job=r.job_id, staleness=0)
        for d in lost:
            ctx.log(end, "drop", client=d.client, version=state.version, job=d.job_id)
        ctx.log(end, "aggregate", version=state.version + 1, clients=[r.client for r in results])

        state.close_round(ctx, results, m, len(late), len(lost), nbytes(payload) * m, end)
        return state

    def eval_metrics(self, ctx: RunContext, state: FlowerSyncState) -> dict:
        return self.sync.eval_metrics(ctx, state)
