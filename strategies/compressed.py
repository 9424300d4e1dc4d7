"""Compressed uplinks for any server-based strategy, with optional error feedback.

Wraps an inner strategy: each client runs the inner local update, then sends its update u_i
through a compressor C (fedsim/compressors.py) under a feedback rule (fedsim/feedback.py:
none, EF, EF21 — Richtárik et al. 2021 —, EControl — Gao, Islamov, Stich, arXiv
2311.05645). The server decodes every message before the inner combine sees it (``receive``);
for EF21 and EControl it keeps each client's estimate h_i (what the client's h_i is known to
be) as per-sender memory in the client-state store and hands the inner strategy h_i + Δ_i.
With full participation and FedAvg this is exactly EF21/EControl's server:
x ← x − η_g Σ_i w_i h_i. Only the update is compressed (inner extras travel dense);
`bytes_up` counts the encoded size.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Optional

import torch

from fedsim import feedback as fb
from fedsim.compressors import COMPRESSORS, decode_many, job_key
from fedsim.config import ComponentSpec, Ge
from fedsim.contributions import Contributions
from fedsim.registry import STRATEGIES
from fedsim.state_types import checkpointable
from fedsim.strategy import (Batches, ClientOutput, ClientState, GradFn, LocalHP, Payload, ServerStrategy,
                             StrategyContext, Tensor)
from fedsim.wrappers import inner_server

ESTIMATE = "h"  # the server's copy of a client's EF21/EControl estimate, in its per-sender memory


@STRATEGIES.register("compressed")
def compressed(
    ctx: Optional[StrategyContext] = None,
    inner: Any = "fedavg",
    compressor: Any = "topk",
    feedback: Literal["none", "ef", "ef21", "econtrol"] = "none",
    eta: Annotated[float, Ge(0)] = 0.1,
) -> ServerStrategy:
    """Any server-based strategy with a compressed client→server update.

    Args:
        inner: The strategy whose uplink is compressed: a name or {name: ..., its knobs}.
        compressor: A compressor name or {name: ..., its knobs}: identity; topk {ratio:
            fraction of coordinates, 0.01}; randk {ratio, unbiased: false}; sign; qsgd {bits
            per coordinate incl. sign: 4, bucket: 512, contractive: false} (fedsim/compressors.py).
        feedback: Error feedback: 'none', 'ef' (error memory), 'ef21', 'econtrol'.
        eta: EControl's feedback strength η (η = 0 gives EF21; ignored by other rules).
    """
    base = inner_server(inner, "compressed", ctx)
    comp = ComponentSpec(COMPRESSORS).resolve("strategy.compressor", compressor).build()
    if base.receive is not None:
        raise ValueError(f"inner strategy {inner!r} already decodes its contributions; it cannot be compressed again")
    rule, keys, tracked = feedback, fb.STATE_KEYS[feedback], fb.tracks_estimate(feedback)

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        own = {k: v for k, v in state.items() if k not in keys}
        out = base.local(payload, own, batches, grad_fn, hp)
        msg, new = fb.send(rule, out.update, state, comp, job_key(), eta)
        return ClientOutput(msg, {**out.state, **new}, out.extras, out.metrics)  # type: ignore[arg-type]

    def client_state(params: Tensor) -> dict[str, Tensor]:
        own = base.client_state(params) if base.client_state is not None else {}
        return {**own, **fb.initial_state(rule, params)}

    def receive(contribs: Contributions, memory: Mapping[str, Tensor]) -> tuple[Contributions, dict[str, Tensor]]:
        """Decodes each message (for EF21/EControl: the sender's estimate h_i + Δ_i, which is
        also the server's new copy of h_i; a sender with several messages in one aggregation
        builds each on the one before)."""
        vectors = fb.receive(rule, decode_many(contribs.updates), memory.get(ESTIMATE), contribs.senders.tolist())
        return contribs.replace(updates=vectors), ({ESTIMATE: vectors} if tracked else {})

    return base._replace(
        local=local,
        client_state=client_state if (keys or base.client_state is not None) else None,
        receive=receive,
        sender_memory=(lambda params: {ESTIMATE: torch.zeros_like(params)}) if tracked else None,
    )
