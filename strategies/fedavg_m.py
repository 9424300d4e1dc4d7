"""FedAvg-M and FedAvg-M-VR (Cheng, Huang, Wu, Yuan; ICLR 2024; arXiv 2306.16504).

FedAvg-M is FedCM (Xu, Wang, Wang, Yao 2021, arXiv 2106.10874). Clients step along
d = β ∇F_i(y; ξ) + (1 − β) g^r, where g^r is the server's gradient estimate; the server sets
g^{r+1} = Σ_i w_i (x^r − y_i^K)/(ηK) and x^{r+1} = x^r − γ g^{r+1}, γ = η_g·η·K (fedsim.drift).
FedAvg-M-VR: d = ∇F_i(y; ξ) + (1 − β)(g^r − ∇F_i(x^{r−1}; ξ)), same ξ at the previous model.
Downlink: x and g (x^{r−1} too for VR); uplink: u_i only. Clients are stateless.

Verified: the FedAvg-M update against FedCM's reference code (RickZack/GHBM, fedcm_client.py:
grad·α + (1 − α)·Δ/(lr·K); fedcm_center_server.py: Δ = mean pseudo-gradient), which ICLR
reviewers state is the same algorithm, and x^{r+1} = x^r − γ g^{r+1} as quoted in the reviews.
Not verified: the VR direction. The paper's Algorithm 1 could not be read here (only its
abstract and reviews were retrievable, and no released code was found), so it is the STORM form
recalled above. What it does (tests/test_momentum.py): with one local step and exact
gradients g^r is exactly ∇f(x^{r−1}), so the run is gradient descent with step γ for any β;
on heterogeneous quadratics its fixed point is FedAvg's at lr η (FedAvg-M's is at ηβ).
What it does not do: train a small MLP on non-IID digits with K = 20 minibatch steps — it
diverges by round 10 at η = 0.05, collapses to chance after ~50 rounds at η = 0.01 and
after ~100 at η = 0.0025 with γ = 0.2, also with β = 0.5 (experiments/papers/momentum,
claims.md). The cause is not established; reading the paper's box is the first check.
Choices (the box's initialisation could not be checked either): round 0 runs without
momentum and sets g^1 (g0='first_round'; 'zero' starts from g^0 = 0, so the first ~1/β
rounds move by about β); x^{−1} = x^0.
"""
from __future__ import annotations

from typing import Annotated

from fedsim.config import Gt
from fedsim.drift import G0, Beta, drift_local, drift_server
from fedsim.registry import STRATEGIES
from fedsim.strategy import Strategy


@STRATEGIES.register("fedavg_m")
def fedavg_m(
    beta: Beta = 0.1, server_lr: Annotated[float, Gt(0)] = 1.0, vr: bool = False, g0: G0 = "first_round"
) -> Strategy:
    """FedAvg with client-level momentum towards the server's gradient estimate (FedCM).

    Args:
        beta: β ∈ (0, 1], the weight of the fresh gradient (1 = FedAvg; small = heavy momentum).
        server_lr: η_g = γ/(ηK), the paper's global learning rate γ over ηK (1.0: γ = ηK).
        vr: Use the variance-reduced direction (FedAvg-M-VR; two gradients per local step).
        g0: 'first_round' (round 0 without momentum; g^1 from its updates) or 'zero' (g^0 = 0).
    """
    return drift_server(drift_local(beta, vr=vr), server_lr, momentum=True, vr=vr, g0=g0)


@STRATEGIES.register("fedavg_m_vr")
def fedavg_m_vr(beta: Beta = 0.1, server_lr: Annotated[float, Gt(0)] = 1.0, g0: G0 = "first_round") -> Strategy:
    """FedAvg-M-VR: `fedavg_m` with `vr: true` (see fedavg_m for the knobs).

    Args:
        beta: β ∈ (0, 1], the weight of the fresh gradient.
        server_lr: η_g = γ/(ηK).
        g0: How g^0 is set ('first_round' or 'zero').
    """
    return fedavg_m(beta, server_lr, vr=True, g0=g0)
