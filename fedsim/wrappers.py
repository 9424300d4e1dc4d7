"""Helpers of strategies that wrap an inner server-based strategy (compressed, robust, dp)."""
from __future__ import annotations

from typing import Any

from .config import ComponentSpec
from .contributions import Contributions
from .registry import STRATEGIES
from .strategy import ServerStrategy, Tensor


def inner_server(inner: Any, wrapper: str, path: str = "strategy.inner") -> ServerStrategy:
    """Builds the inner strategy `inner` (a name or {name: ..., knobs}) of the wrapper named
    `wrapper`; raises ValueError unless it is server-based."""
    base = ComponentSpec(STRATEGIES, default="fedavg").resolve(path, inner).build()
    if not isinstance(base, ServerStrategy):
        raise ValueError(f"inner strategy {inner!r} has no server part; {wrapper} wraps server-based strategies")
    return base


def with_update(contribs: Contributions, update: Tensor) -> Contributions:
    """Returns `contribs` with every row's update replaced by the one vector `update` ``[d]``."""
    return contribs.replace(updates=update.unsqueeze(0).expand(len(contribs), *update.shape))
