"""Compressed uplinks for any server-based strategy, with optional error feedback.

Wraps an inner strategy: each client runs the inner local update, then sends its update u_i
through a compressor C (fedsim/compressors.py) under a feedback rule (fedsim/feedback.py:
none, EF, EF21 — Richtárik et al. 2021 —, EControl — Gao, Islamov, Stich, arXiv
2311.05645). The server decodes every message before the inner combine sees it; for EF21
and EControl it keeps each client's estimate h_i (what the client's h_i is known to be) and
hands the inner strategy h_i + Δ_i. With full participation and FedAvg this is exactly
EF21/EControl's server: x ← x − η_g Σ_i w_i h_i. Only the update is compressed (inner
extras travel dense); `bytes_up` counts the encoded size.
Memory: the server's estimates cost one vector per client that has reported (EF21, EControl).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, NamedTuple, Sequence

import torch

from fedsim import feedback as fb
from fedsim.compressors import COMPRESSORS, job_key
from fedsim.config import ComponentSpec, Ge
from fedsim.errors import DivergenceError
from fedsim.registry import STRATEGIES
from fedsim.state_types import checkpointable
from fedsim.strategy import Batches, ClientOutput, ClientState, CombineContext, GradFn, LocalHP, Msg, Payload, Strategy, Tensor


@checkpointable
class CompressedState(NamedTuple):
    """Server state: the inner strategy's state and the per-client estimates h_i."""

    inner: Any
    estimates: dict[int, Tensor]


@STRATEGIES.register("compressed")
def compressed(
    inner: Any = "fedavg",
    compressor: Any = "topk",
    feedback: Literal["none", "ef", "ef21", "econtrol"] = "none",
    eta: Annotated[float, Ge(0)] = 0.1,
) -> Strategy:
    """Any server-based strategy with a compressed client→server update.

    Args:
        inner: The strategy whose uplink is compressed: a name or {name: ..., its knobs}.
        compressor: A compressor name or {name: ..., its knobs}: identity; topk {ratio:
            fraction of coordinates, 0.01}; randk {ratio, unbiased: false}; sign; qsgd {bits
            per coordinate incl. sign: 4, bucket: 512, contractive: false} (fedsim/compressors.py).
        feedback: Error feedback: 'none', 'ef' (error memory), 'ef21', 'econtrol'.
        eta: EControl's feedback strength η (η = 0 gives EF21; ignored by other rules).
    """
    base: Strategy = ComponentSpec(STRATEGIES, default="fedavg").resolve("strategy.inner", inner).build()
    comp = ComponentSpec(COMPRESSORS).resolve("strategy.compressor", compressor).build()
    if not base.server_based:
        raise ValueError(f"inner strategy {inner!r} has no server part; compressed wraps server-based strategies")
    rule, keys = feedback, fb.STATE_KEYS[feedback]

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        own = {k: v for k, v in state.items() if k not in keys}
        out = base.local(payload, own, batches, grad_fn, hp)
        msg, new = fb.send(rule, out.update, state, comp, job_key(), eta)
        return ClientOutput(msg, {**out.state, **new}, out.extras, out.metrics)  # type: ignore[arg-type]

    def client_state(params: Tensor) -> dict[str, Tensor]:
        own = base.client_state(params) if base.client_state is not None else {}
        return {**own, **fb.initial_state(rule, params)}

    def combine(state: CompressedState, msgs: Sequence[Msg], ctx: CombineContext) -> CompressedState:
        estimates, dense = dict(state.estimates), []
        for m in msgs:
            vector = fb.receive(rule, m.update, estimates.get(m.sender))
            if not bool(torch.isfinite(vector).all()):  # the protocol's check sees only encoded messages
                raise DivergenceError(f"client {m.sender}'s decoded update has NaN/inf at server version "
                                      f"{ctx.version}; lower local.lr, the server learning rate or eta")
            if fb.tracks_estimate(rule):
                estimates[m.sender] = vector
            dense.append(dataclasses.replace(m, update=vector))
        return CompressedState(base.combine(state.inner, dense, ctx), estimates)

    return Strategy(
        local=local,
        init=lambda params: CompressedState(base.init(params), {}),  # type: ignore[misc]
        publish=lambda s: base.publish(s.inner),  # type: ignore[misc]
        combine=combine,
        params=lambda s: base.params(s.inner),  # type: ignore[misc]
        client_state=client_state if (keys or base.client_state is not None) else None,
        metrics=(lambda s: base.metrics(s.inner)) if base.metrics is not None else None,  # type: ignore[misc]
    )
