"""Byzantine-robust aggregation for any server-based strategy.

Wraps an inner strategy: before the inner combine runs, the aggregation's updates
u_1..u_m (after the inner ``receive``, so decoded if compressed) are reduced to one robust
estimate r by a reducer from fedsim/robust.py (median, trimmed mean, Krum, multi-Krum,
Bulyan, centered clipping), and every row's update is replaced by r. The inner combine then
reads the same r in every row: a strategy whose reduction is the weighted sum Σ_i w_i u_i
(FedAvg, FedAvgM, FedOpt, FedBuff) steps with r·Σ_i w_i — r itself when the protocol's
weights sum to 1. Only the update is made robust; extras (SCAFFOLD's Δc_i) reach the inner
strategy as sent. The wrapper keeps the last aggregate r, the center of centered clipping
(0 before the first aggregation).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from fedsim.config import ComponentSpec
from fedsim.contributions import Contributions
from fedsim.registry import STRATEGIES
from fedsim.robust import REDUCERS
from fedsim.state_types import checkpointable
from fedsim.strategy import CombineContext, ServerStrategy, StrategyContext, Tensor
from fedsim.wrappers import inner_server, with_update


@checkpointable
class RobustState(NamedTuple):
    """The inner strategy's state and the last robust aggregate (centered clipping's center)."""

    inner: Any
    center: Tensor


@STRATEGIES.register("robust")
def robust(ctx: Optional[StrategyContext] = None, inner: Any = "fedavg", reducer: Any = "median") -> ServerStrategy:
    """Any server-based strategy with a Byzantine-robust reduction of the clients' updates.

    Args:
        inner: The strategy made robust: a name or {name: ..., its knobs}.
        reducer: A reducer name or {name: ..., its knobs}: mean (no robustness); median;
            trimmed_mean {trim: β, 0.1}; krum {f: 1, select: 1 (more: multi-Krum)};
            bulyan {f: 1}; centered_clip {tau: 1.0, iters: 1} (fedsim/robust.py).
    """
    base = inner_server(inner, "robust", ctx)
    reduce = ComponentSpec(REDUCERS).resolve("strategy.reducer", reducer).build()

    def init(params: Tensor) -> RobustState:
        return RobustState(base.init(params), torch.zeros_like(params))

    def combine(state: RobustState, contribs: Contributions, ctx: CombineContext) -> RobustState:
        if not len(contribs):
            return RobustState(base.combine(state.inner, contribs, ctx), state.center)
        r = reduce(contribs.updates, state.center)
        return RobustState(base.combine(state.inner, with_update(contribs, r), ctx), r)

    inner_metrics = base.metrics
    return base._replace(
        init=init,
        publish=lambda s: base.publish(s.inner),
        combine=combine,
        params=lambda s: base.params(s.inner),
        metrics=(lambda s: inner_metrics(s.inner)) if inner_metrics is not None else None,
    )
