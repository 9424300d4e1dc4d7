"""FedAsync (Xie, Koyejo, Gupta — "Asynchronous Federated Optimization", OPT 2020, arXiv 1903.03934).

The server mixes each arriving client model into the global one:
x ← (1 − α_t)·x + α_t·y_i with α_t = α·s(t − τ), s a staleness function (constant,
polynomial (1 + t − τ)^−a, hinge). Clients run K local SGD steps from the model x_τ they
received, optionally on the regularised objective f_i(y) + ρ/2·‖y − x_τ‖².
Run it under ``protocol: {name: async}`` (one arrival per aggregation).

Deviation: if a protocol hands several messages at once, each mixes with its weight w_i
from the protocol: x ← x + Σ_i w_i·α·s(τ_i)·(y_i − x) (with one message, w = 1: the paper).
Formulas checked against Plato's and FedLab's FedAsync servers (the paper's own code is not public).
"""
from __future__ import annotations

from typing import Annotated, Any

from fedsim.blocks import ServerState, fl_server
from fedsim.config import Ge, Range
from fedsim.local import gradient, local_lr, sgd_steps
from fedsim.registry import STRATEGIES
from fedsim.staleness import from_config
from fedsim.contributions import Contributions
from fedsim.strategy import Batches, ClientOutput, ClientState, CombineContext, GradFn, LocalHP, Payload, ServerStrategy


@STRATEGIES.register("fedasync")
def fedasync(
    alpha: Annotated[float, Range(0.0, 1.0, open_lo=True)] = 0.6,
    staleness: Any = "constant",
    rho: Annotated[float, Ge(0)] = 0.0,
) -> ServerStrategy:
    """Asynchronous mixing of client models into the global model.

    Args:
        alpha: Mixing weight α ∈ (0, 1].
        staleness: s(t − τ) scaling α: 'constant', {name: polynomial, a: 0.5} or {name: hinge, a: 10, b: 4}.
        rho: Weight ρ of the proximal term ρ/2·‖y − x_τ‖² in the local objective (0: plain SGD).
    """
    s = from_config(staleness)

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        x0 = payload.params

        def proximal(y, batch, grad, k):
            g, loss = grad(y, batch)
            return g + rho * (y - x0), loss

        y, loss = sgd_steps(x0, batches, grad_fn, hp, proximal if rho else gradient, lr=local_lr(payload, hp))
        return ClientOutput(x0 - y, {}, {}, {"train_loss": loss})

    def combine(state: ServerState, contribs: Contributions, ctx: CombineContext) -> ServerState:
        x = state.params
        mix = sum(c.weight * alpha * s(c.staleness) * ((c.base - c.update) - x) for c in contribs.rows())  # y_i = x_τ − u_i
        return ServerState(x + mix, state.opt) if len(contribs) else state

    return fl_server(local)._replace(combine=combine)
