"""Server-side building blocks: reducers, optax-style transforms, and the FL server builder.

`fl_server(local, reduce, transform)` is a complete server-based strategy: it folds the
messages of one aggregation into one pseudo-gradient with `reduce`, turns it into a step
with `transform`, and applies ``x ← x − step``. FedAvg, FedAvgM and FedAdam differ only in
the transform; new server optimisers are new transforms, not new strategies.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from . import vec
from .staleness import StalenessFn, constant
from .contributions import Contributions
from .strategy import CombineContext, LocalUpdate, Payload, ServerStrategy, Tensor
from .state_types import checkpointable

Reduce = Callable[[Contributions], Tensor]


def weighted_sum(staleness: StalenessFn = constant()) -> Reduce:
    """Returns the reducer Σ_i w_i · s(τ_i) · u_i (weights already normalised by the protocol)."""

    def reduce(c: Contributions) -> Tensor:
        return vec.weighted_sum(c.updates, c.scaled_weights(staleness).tolist())

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


@checkpointable
class AdaptiveState(NamedTuple):
    """State of the FedOpt transforms: first moment m, second moment v, steps taken t."""

    m: Tensor
    v: Tensor
    t: int


def _adaptive(lr: float, b1: float, tau: float, second: Callable[[Tensor, Tensor], Tensor], v0: float,
              b2_correction: float | None = None) -> Transform:
    """FedOpt's server step (Reddi et al. 2021, Alg. 2) in our sign convention (u = −Δ):
    m ← β₁m + (1−β₁)u, v ← second(v, u²), step = η·m / (√v + τ); v starts at `v0`.
    With `b2_correction` = β₂ (Adam's bias correction, not in the paper) m and v are divided
    by (1 − β₁ᵗ) and (1 − β₂ᵗ)."""

    def init(params: Tensor) -> AdaptiveState:
        return AdaptiveState(torch.zeros_like(params), torch.full_like(params, v0), 0)

    def update(u: Tensor, state: AdaptiveState, params: Tensor) -> tuple[Tensor, AdaptiveState]:
        t = state.t + 1
        m = b1 * state.m + (1 - b1) * u
        v = second(state.v, u * u)
        m_hat, v_hat = m, v
        if b2_correction is not None:
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2_correction**t)
        return lr * m_hat / (v_hat.sqrt() + tau), AdaptiveState(m, v, t)

    return Transform(init, update)


def adam(lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3, bias_correction: bool = False) -> Transform:
    """FedAdam's server step: v ← β₂v + (1−β₂)u². Without bias correction v starts at τ²
    (the paper's v₋₁ ≥ τ²); with it, m and v start at 0 as in Adam (Kingma & Ba)."""
    return _adaptive(lr, b1, tau, lambda v, g2: b2 * v + (1 - b2) * g2,
                     0.0 if bias_correction else tau**2, b2 if bias_correction else None)


def yogi(lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> Transform:
    """FedYogi's server step: v ← v − (1−β₂)·u²·sign(v − u²), v starting at τ²."""
    return _adaptive(lr, b1, tau, lambda v, g2: v - (1 - b2) * g2 * torch.sign(v - g2), tau**2)


def adagrad(lr: float, b1: float = 0.0, tau: float = 1e-3) -> Transform:
    """FedAdagrad's server step: v ← v + u², v starting at τ²."""
    return _adaptive(lr, b1, tau, lambda v, g2: v + g2, tau**2)


@checkpointable
class ServerState(NamedTuple):
    """State of `fl_server`: the global model x and the transform's state."""

    params: Tensor
    opt: Any


def fl_server(
    local: LocalUpdate,
    reduce: Reduce | None = None,
    transform: Transform | None = None,
    client_state: Callable[[Tensor], dict[str, Tensor]] | None = None,
) -> ServerStrategy:
    """Returns a server-based strategy: x ← x − transform(reduce(contributions)).

    An aggregation with no messages (an empty FedFix window) leaves the state unchanged.
    """
    reduce = reduce or weighted_sum()
    transform = transform or sgd(1.0)

    def init(params: Tensor) -> ServerState:
        return ServerState(params, transform.init(params))

    def publish(state: ServerState) -> Payload:
        return Payload(state.params)

    def combine(state: ServerState, contribs: Contributions, ctx: CombineContext) -> ServerState:
        if not len(contribs):
            return state
        step, opt = transform.update(reduce(contribs), state.opt, state.params)
        return ServerState(state.params - step, opt)

    return ServerStrategy(
        local=local,
        init=init,
        publish=publish,
        combine=combine,
        params=lambda s: s.params,
        client_state=client_state,
    )
