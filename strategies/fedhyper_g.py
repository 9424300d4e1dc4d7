"""FedHyper-G and FedHyper-GM (Wang, Wang, Li, "FedHyper: A Universal and Robust Learning Rate
Scheduler for Federated Learning with Hypergradient Descent", ICLR 2024, arXiv 2310.03156).

Clients run FedAvg's local SGD; the server's rate follows a hypergradient,
η_g ← clip(η_g + β_h·⟨Δ_{t−1}, Δ_t⟩, η_min, η_max), and steps x ← x + η_g Δ_t (G).
GM keeps m_t = Δ_t + 0.9 m_{t−1}, uses ⟨m_{t−1}, Δ_t⟩ and steps x ← x + Δ_t + (η_g − 1) m_t,
exactly as the released code does (its momentum term is scaled by η_g − 1).
"""
from __future__ import annotations

from typing import Annotated

from fedsim.blocks import chain, fl_server
from fedsim.config import Ge, Gt, Range
from fedsim.hypergrad import (Normalize, StepRule, check_bounds, hyper_local, hypergrad_lr, last_update,
                              with_server_extras)
from fedsim.registry import STRATEGIES
from fedsim.strategy import ServerStrategy


@STRATEGIES.register("fedhyper_g")
def fedhyper_g(
    server_lr: Annotated[float, Gt(0)] = 1.0,
    hyper_lr: Annotated[float, Ge(0)] = 1.0,
    lr_min: Annotated[float, Gt(0)] = 0.2,
    lr_max: Annotated[float, Gt(0)] = 5.0,
    normalize: Normalize = "none",
) -> ServerStrategy:
    """FedHyper-G: a global learning rate driven by the hypergradient.

    Args:
        server_lr: Initial global learning rate η_g^0 (the code starts at 1).
        hyper_lr: Hyper learning rate β_h (1 in the code, which sums ⟨·,·⟩ over all parameters).
        lr_min: Lower bound η_min of the global learning rate.
        lr_max: Upper bound η_max of the global learning rate.
        normalize: 'none' (raw inner product, the paper), 'cosine' (of the two updates) or
            'sigmoid' (σ(0.1⟨·,·⟩) − ½); normalised forms move η_g on small models too.
    """
    return hyper_global(server_lr, hyper_lr, lr_min, lr_max, normalize, momentum=0.0)


@STRATEGIES.register("fedhyper_gm")
def fedhyper_gm(
    server_lr: Annotated[float, Gt(0)] = 1.0,
    hyper_lr: Annotated[float, Ge(0)] = 1.0,
    lr_min: Annotated[float, Gt(0)] = 0.8,
    lr_max: Annotated[float, Gt(0)] = 5.0,
    normalize: Normalize = "none",
    momentum: Annotated[float, Range(0.0, 1.0, open_hi=True)] = 0.9,
) -> ServerStrategy:
    """FedHyper-GM: FedHyper-G with server momentum (the code's recommended variant).

    Args:
        server_lr: Initial global learning rate η_g^0 (1 in the code; η_g < 1 makes the momentum term negative).
        hyper_lr: Hyper learning rate β_h.
        lr_min: Lower bound of η_g (0.8 in the code).
        lr_max: Upper bound of η_g.
        normalize: 'none', 'cosine' or 'sigmoid' (see fedhyper_g).
        momentum: Server momentum μ (0.9 in the code).
    """
    return hyper_global(server_lr, hyper_lr, lr_min, lr_max, normalize, momentum)


def hyper_global(server_lr: float, hyper_lr: float, lr_min: float, lr_max: float, normalize: str, momentum: float,
                 rule: StepRule | None = None) -> ServerStrategy:
    """Returns the G/GM server; with a client `rule` (CL, FULL) the payload adds u_{t−1} as `prev_update`."""
    check_bounds("strategy.server_lr", lr_min, server_lr, lr_max)
    transform = hypergrad_lr(server_lr, hyper_lr, lr_min, lr_max, momentum, normalize)
    server = fl_server(hyper_local(rule), transform=chain(last_update(), transform))
    extras = (lambda opt: {"prev_update": opt[0]}) if rule is not None else (lambda opt: {})
    return with_server_extras(server, extras, lambda opt: {"global_lr": opt[1].lr})
