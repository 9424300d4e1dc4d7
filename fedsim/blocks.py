"""Server-side building blocks: reducers, optax-style transforms, and the FL server builder.

`fl_server(local, reduce, transform)` is a complete server-based strategy: it folds the
messages of one aggregation into one pseudo-gradient with `reduce`, turns it into a step
with `transform`, and applies ``x ← x − step``. FedAvg, FedAvgM and FedAdam differ only in
the transform; new server optimisers are new transforms, not new strategies.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import vec
from .staleness import StalenessFn, constant
from .strategy import CombineContext, LocalUpdate, Msg, Payload, Strategy, Tensor

Reduce = Callable[[Sequence[Msg]], Tensor]


def weighted_sum(staleness: StalenessFn = constant()) -> Reduce:
    """Returns the reducer Σ_i w_i · s(τ_i) · u_i (weights already normalised by the protocol)."""

    def reduce(msgs: Sequence[Msg]) -> Tensor:
        return vec.weighted_sum([m.update for m in msgs], [m.weight * staleness(m.staleness) for m in msgs])

    return reduce


class Transform(NamedTuple):
    """An optax-style gradient transformation over flat vectors."""

    init: Callable[[Tensor], Any]
    update: Callable[[Tensor, Any, Tensor], "tuple[Tensor, Any]"]  # (u, state, params) -> (step, state)


def sgd(lr: float = 1.0, momentum: float = 0.0, nesterov: bool = False) -> Transform:
    """Server SGD: step = η_g·u, or heavy-ball v ← μv + u, step = η_g·v (FedAvgM, Hsu et al. 2019)."""

    def init(params: Tensor) -> Any:
        return torch.zeros_like(params) if momentum else ()

    def update(u: Tensor, state: Any, params: Tensor) -> tuple[Tensor, Any]:
        if not momentum:
            return lr * u, ()
        v = momentum * state + u
        return lr * (u + momentum * v if nesterov else v), v

    return Transform(init, update)


def chain(*transforms: Transform) -> Transform:
    """Applies transforms left to right; the state is the tuple of their states."""

    def init(params: Tensor) -> Any:
        return tuple(t.init(params) for t in transforms)

    def update(u: Tensor, state: Any, params: Tensor) -> tuple[Tensor, Any]:
        new = []
        for t, s in zip(transforms, state):
            u, s = t.update(u, s, params)
            new.append(s)
        return u, tuple(new)

    return Transform(init, update)


class ServerState(NamedTuple):
    """State of `fl_server`: the global model x and the transform's state."""

    params: Tensor
    opt: Any


def fl_server(
    local: LocalUpdate,
    reduce: Reduce | None = None,
    transform: Transform | None = None,
    client_state: Callable[[Tensor], dict[str, Tensor]] | None = None,
) -> Strategy:
    """Returns a server-based strategy: x ← x − transform(reduce(msgs)).

    An aggregation with no messages (an empty FedFix window) leaves the state unchanged.
    """
    reduce = reduce or weighted_sum()
    transform = transform or sgd(1.0)

    def init(params: Tensor) -> ServerState:
        return ServerState(params, transform.init(params))

    def publish(state: ServerState) -> Payload:
        return Payload(state.params)

    def combine(state: ServerState, msgs: Sequence[Msg], ctx: CombineContext) -> ServerState:
        if not msgs:
            return state
        step, opt = transform.update(reduce(msgs), state.opt, state.params)
        return ServerState(state.params - step, opt)

    return Strategy(
        local=local,
        init=init,
        publish=publish,
        combine=combine,
        params=lambda s: s.params,
        client_state=client_state,
    )
