"""FedHyper-CL and FedHyper-FULL (Wang, Wang, Li, ICLR 2024, arXiv 2310.03156): client-side rate schedules.

Each client gets the previous global update Δ_{t−1} with the model and scales its rate η_l^0
by b (reset to 1 every round): after each step δ_k, γ = min(1.1, 1 + 0.1⟨δ_k, Δ_{t−1}⟩/s +
⟨δ_k, δ_{k−1}⟩), b ← clip(γ b, 0.1, 10) (δ_{k−1} = Δ_{t−1} at first). CL keeps a fixed global
rate; FULL is GM on the server plus CL on the clients. β_h (ours) scales the hypergradient
term of γ; the code has β_h = 1. Deviation: see `fedsim.hypergrad.hyper_sgd_steps`.
"""
from __future__ import annotations

from typing import Annotated

from fedsim.config import Ge, Gt, Range
from fedsim.blocks import chain, fl_server, sgd
from fedsim.hypergrad import Normalize, StepRule, check_bounds, hyper_local, last_update, with_server_extras
from fedsim.registry import STRATEGIES
from fedsim.strategy import ServerStrategy

from .fedhyper_g import hyper_global


@STRATEGIES.register("fedhyper_cl")
def fedhyper_cl(
    server_lr: Annotated[float, Gt(0)] = 1.0,
    client_hyper_lr: Annotated[float, Ge(0)] = 1.0,
    global_coef: Annotated[float, Ge(0)] = 0.01,
    growth_cap: Annotated[float, Ge(1)] = 1.1,
    multiplier_min: Annotated[float, Gt(0)] = 0.1,
    multiplier_max: Annotated[float, Gt(0)] = 10.0,
    client_normalize: Normalize = "none",
) -> ServerStrategy:
    """FedHyper-CL: every client schedules its own rate per step; fixed global rate.

    Args:
        server_lr: Global learning rate η_g (fixed).
        client_hyper_lr: β_h of the clients' rule (1 in the code).
        global_coef: Weight of ⟨δ_k, Δ_{t−1}⟩ in γ (the code's 0.1/s, s = 10 clients per round).
        growth_cap: Largest growth factor γ of the multiplier per step.
        multiplier_min: Lower bound of the multiplier b (of η_l^0).
        multiplier_max: Upper bound of the multiplier b.
        client_normalize: 'none', 'cosine' or 'sigmoid' form of both inner products.
    """
    rule = client_rule(client_hyper_lr, global_coef, growth_cap, multiplier_min, multiplier_max, client_normalize)
    # the server: x ← x − η_g u_t (FedAvg), keeping u_t to send as Δ_{t−1} next round
    server = fl_server(hyper_local(rule), transform=chain(last_update(), sgd(server_lr)))
    return with_server_extras(server, lambda opt: {"prev_update": opt[0]}, lambda opt: {"global_lr": server_lr})


@STRATEGIES.register("fedhyper_full")
def fedhyper_full(
    server_lr: Annotated[float, Gt(0)] = 1.0,
    hyper_lr: Annotated[float, Ge(0)] = 1.0,
    lr_min: Annotated[float, Gt(0)] = 0.8,
    lr_max: Annotated[float, Gt(0)] = 5.0,
    normalize: Normalize = "none",
    momentum: Annotated[float, Range(0.0, 1.0, open_hi=True)] = 0.9,
    client_hyper_lr: Annotated[float, Ge(0)] = 1.0,
    global_coef: Annotated[float, Ge(0)] = 0.01,
    growth_cap: Annotated[float, Ge(1)] = 1.1,
    multiplier_min: Annotated[float, Gt(0)] = 0.1,
    multiplier_max: Annotated[float, Gt(0)] = 10.0,
    client_normalize: Normalize = "none",
) -> ServerStrategy:
    """FedHyper-FULL: FedHyper-GM on the server and FedHyper-CL on the clients.

    Args:
        server_lr: Initial global learning rate η_g^0.
        hyper_lr: Server β_h (see fedhyper_gm).
        lr_min: Lower bound of η_g.
        lr_max: Upper bound of η_g.
        normalize: Server form of the inner product: 'none', 'cosine' or 'sigmoid'.
        momentum: Server momentum μ.
        client_hyper_lr: Client β_h (see fedhyper_cl).
        global_coef: Weight of ⟨δ_k, Δ_{t−1}⟩ in γ.
        growth_cap: Largest growth factor γ per step.
        multiplier_min: Lower bound of the multiplier b.
        multiplier_max: Upper bound of the multiplier b.
        client_normalize: Client form of the inner products.
    """
    rule = client_rule(client_hyper_lr, global_coef, growth_cap, multiplier_min, multiplier_max, client_normalize)
    return hyper_global(server_lr, hyper_lr, lr_min, lr_max, normalize, momentum, rule)


def client_rule(beta: float, coef: float, cap: float, lo: float, hi: float, normalize: str) -> StepRule:
    """Returns the clients' StepRule after checking that b = 1 lies within [lo, hi]."""
    check_bounds("strategy.multiplier_min", lo, 1.0, hi)
    return StepRule(beta, coef, cap, lo, hi, normalize)
