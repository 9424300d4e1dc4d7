"""FedAdam, FedYogi, FedAdagrad (Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar,
McMahan — "Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295).

Clients run plain local SGD; the server treats the averaged pseudo-gradient u = Σ_i w_i u_i
as a gradient for an adaptive optimiser (Alg. 2): m ← β₁m + (1−β₁)u, v ← Adam / Yogi /
Adagrad rule on u², x ← x − η·m / (√v + τ), with v₋₁ = τ² and no bias correction.
Deviation: the paper averages uniformly over the sampled clients; here the protocol's
weighting applies (`protocol.weighting: identical` gives the paper's mean).
"""
from __future__ import annotations

from typing import Annotated

from fedsim.blocks import adagrad, adam, fl_server, yogi
from fedsim.config import Gt, Range
from fedsim.local import plain_sgd
from fedsim.registry import STRATEGIES
from fedsim.strategy import ServerStrategy

Beta = Annotated[float, Range(0.0, 1.0, open_hi=True)]


@STRATEGIES.register("fedadam")
def fedadam(server_lr: Annotated[float, Gt(0)] = 0.01, beta1: Beta = 0.9, beta2: Beta = 0.99,
            tau: Annotated[float, Gt(0)] = 1e-3, bias_correction: bool = False) -> ServerStrategy:
    """FedAvg clients, Adam on the server: v ← β₂v + (1−β₂)u².

    Args:
        server_lr: Server learning rate η.
        beta1: First-moment decay β₁.
        beta2: Second-moment decay β₂.
        tau: Adaptivity τ: added to √v and the start value of v (v₋₁ = τ²).
        bias_correction: Adam's bias correction (m, v start at 0); the paper uses none.
    """
    return fl_server(plain_sgd(), transform=adam(server_lr, beta1, beta2, tau, bias_correction))


@STRATEGIES.register("fedyogi")
def fedyogi(server_lr: Annotated[float, Gt(0)] = 0.01, beta1: Beta = 0.9, beta2: Beta = 0.99,
            tau: Annotated[float, Gt(0)] = 1e-3) -> ServerStrategy:
    """FedAvg clients, Yogi on the server: v ← v − (1−β₂)u²·sign(v − u²).

    Args:
        server_lr: Server learning rate η.
        beta1: First-moment decay β₁.
        beta2: Second-moment decay β₂.
        tau: Adaptivity τ (v₋₁ = τ²).
    """
    return fl_server(plain_sgd(), transform=yogi(server_lr, beta1, beta2, tau))


@STRATEGIES.register("fedadagrad")
def fedadagrad(server_lr: Annotated[float, Gt(0)] = 0.01, beta1: Beta = 0.0,
               tau: Annotated[float, Gt(0)] = 1e-3) -> ServerStrategy:
    """FedAvg clients, Adagrad on the server: v ← v + u².

    Args:
        server_lr: Server learning rate η.
        beta1: First-moment decay β₁ (the paper's experiments use 0 for Adagrad).
        tau: Adaptivity τ (v₋₁ = τ²).
    """
    return fl_server(plain_sgd(), transform=adagrad(server_lr, beta1, tau))
