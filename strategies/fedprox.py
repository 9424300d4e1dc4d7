"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith — MLSys 2020, arXiv 1812.06127).

Client k approximately minimises h_k(y) = F_k(y) + (μ/2)‖y − x^t‖² by K local SGD steps,
i.e. each step follows ∇F_k(y) + μ(y − x^t), and uploads u_k = x^t − y_k^K. The server
averages as FedAvg does: x^{t+1} = x^t − η_g Σ_k w_k s(τ_k) u_k (η_g = 1: plain averaging).
μ = 0 is exactly FedAvg.
"""
from __future__ import annotations

from typing import Annotated, Any

from fedsim.blocks import fl_server, sgd, weighted_sum
from fedsim.config import Ge, Gt
from fedsim.local import local_lr, sgd_steps
from fedsim.registry import STRATEGIES
from fedsim.staleness import from_config
from fedsim.strategy import Batch, Batches, ClientOutput, ClientState, GradFn, LocalHP, LocalUpdate, Payload, ServerStrategy, Tensor


def proximal_sgd(mu: float) -> LocalUpdate:
    """Returns FedProx's local update: K SGD steps along ∇F(y) + μ(y − x), upload x − y_K."""

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        x = payload.params

        def direction(y: Tensor, batch: Batch, grad: GradFn, k: int) -> tuple[Tensor, Tensor]:
            g, loss = grad(y, batch)
            return g + mu * (y - x), loss

        y, loss = sgd_steps(x, batches, grad_fn, hp, direction, lr=local_lr(payload, hp))
        return ClientOutput(x - y, {}, {}, {"train_loss": loss})

    return local


@STRATEGIES.register("fedprox")
def fedprox(
    mu: Annotated[float, Ge(0)] = 0.01,
    server_lr: Annotated[float, Gt(0)] = 1.0,
    staleness: Any = "constant",
) -> ServerStrategy:
    """FedAvg with a proximal term μ/2‖y − x‖² in every client's local objective.

    Args:
        mu: Proximal coefficient μ (the paper tunes μ ∈ {0.001, 0.01, 0.1, 1}; 0 = FedAvg).
        server_lr: Global learning rate η_g (1.0 = plain averaging, as in the paper).
        staleness: Staleness weight s(τ) for asynchronous protocols (as in fedavg).
    """
    return fl_server(proximal_sgd(mu), reduce=weighted_sum(from_config(staleness)), transform=sgd(server_lr))
