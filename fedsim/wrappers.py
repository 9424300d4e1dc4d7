"""Helpers of strategies that wrap an inner server-based strategy (compressed, robust, dp)."""
from __future__ import annotations

import inspect
from typing import Any, Optional

from .config import Component, ComponentSpec
from .contributions import Contributions
from .registry import STRATEGIES
from .strategy import ServerStrategy, StrategyContext, Tensor


def build_strategy(component: Component, ctx: Optional[StrategyContext]) -> Any:
    """Builds a resolved strategy section, passing `ctx` when its factory declares a ``ctx`` parameter."""
    if ctx is not None and "ctx" in inspect.signature(component.entry.factory).parameters:
        return component.build(ctx=ctx)
    return component.build()


def inner_server(inner: Any, wrapper: str, ctx: Optional[StrategyContext] = None,
                 path: str = "strategy.inner") -> ServerStrategy:
    """Builds the inner strategy `inner` (a name or {name: ..., knobs}) of the wrapper named
    `wrapper`, handing it the wrapper's `ctx`; raises ValueError unless it is server-based."""
    base = build_strategy(ComponentSpec(STRATEGIES, default="fedavg").resolve(path, inner), ctx)
    if not isinstance(base, ServerStrategy):
        raise ValueError(f"inner strategy {inner!r} has no server part; {wrapper} wraps server-based strategies")
    return base


def with_update(contribs: Contributions, update: Tensor) -> Contributions:
    """Returns `contribs` with every row's update replaced by the one vector `update` ``[d]``."""
    return contribs.replace(updates=update.unsqueeze(0).expand(len(contribs), *update.shape))
