"""FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629) and FedAvgM (Hsu, Qi, Brown 2019, arXiv 1909.06335).

Each client runs K local SGD steps from the global model x and uploads u_i = x − y_i^K.
The server folds u = Σ_i w_i s(τ_i) u_i — w_i from the protocol's weighting (by samples
by default), s the staleness weight (1 in synchronous rounds) — and steps x ← x − η_g u;
with server momentum β: v ← β v + u, x ← x − η_g v.
"""
from __future__ import annotations

from typing import Annotated, Any

from fedsim.blocks import fl_server, sgd, weighted_sum
from fedsim.config import Gt, Range
from fedsim.local import plain_sgd
from fedsim.registry import STRATEGIES
from fedsim.staleness import from_config
from fedsim.strategy import ServerStrategy


@STRATEGIES.register("fedavg")
def fedavg(
    server_lr: Annotated[float, Gt(0)] = 1.0,
    server_momentum: Annotated[float, Range(0.0, 1.0, open_hi=True)] = 0.0,
    nesterov: bool = False,
    staleness: Any = "constant",
) -> ServerStrategy:
    """Federated averaging, with optional server momentum (FedAvgM).

    Args:
        server_lr: Global learning rate η_g (1.0 = plain averaging of client models).
        server_momentum: Server momentum β; 0 gives FedAvg, > 0 FedAvgM.
        nesterov: Use Nesterov momentum on the server.
        staleness: Staleness weight s(τ) for asynchronous protocols: 'constant',
            {name: polynomial, a: 0.5} or {name: hinge, a: 10, b: 4}.
    """
    return fl_server(
        plain_sgd(),
        reduce=weighted_sum(from_config(staleness)),
        transform=sgd(server_lr, server_momentum, nesterov),
    )
