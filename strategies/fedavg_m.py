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

from typing import Annotated, NamedTuple

import torch

from fedsim import vec
from fedsim.blocks import weighted_sum
from fedsim.config import Gt
from fedsim.contributions import Contributions
from fedsim.drift import G0, Beta, per_step_mean, storm, toward
from fedsim.local import local_lr, sgd_steps
from fedsim.registry import STRATEGIES
from fedsim.strategy import ClientOutput, CombineContext, Payload, ServerStrategy, Tensor
from fedsim.state_types import checkpointable


@checkpointable
class MomentumState(NamedTuple):
    """Server state: x^r, ηg^r (in per-step units, `fedsim.drift`), x^{r−1}, and whether g is in use yet."""

    params: Tensor
    g: Tensor
    prev: Tensor
    started: bool


@STRATEGIES.register("fedavg_m")
def fedavg_m(
    beta: Beta = 0.1, server_lr: Annotated[float, Gt(0)] = 1.0, vr: bool = False, g0: G0 = "first_round"
) -> ServerStrategy:
    """FedAvg with client-level momentum towards the server's gradient estimate (FedCM).

    Args:
        beta: β ∈ (0, 1], the weight of the fresh gradient (1 = FedAvg; small = heavy momentum).
        server_lr: η_g = γ/(ηK), the paper's global learning rate γ over ηK (1.0: γ = ηK).
        vr: Use the variance-reduced direction (FedAvg-M-VR; two gradients per local step).
        g0: 'first_round' (round 0 without momentum; g^1 from its updates) or 'zero' (g^0 = 0).
    """
    average = weighted_sum()

    def local(payload: Payload, state, batches, grad_fn, hp) -> ClientOutput:
        x, extras, eta = payload.params, payload.extras, local_lr(payload, hp)
        g = extras["g"] / eta if "g" in extras else None  # absent in round 0 with g0 = 'first_round'

        def direction(y, batch, grad_fn, k):  # β ∇F_i(y; ξ) + (1 − β) g^r; VR: g^r + ∇F_i(y; ξ) − ∇F_i(x^{r−1}; ξ)
            grad, loss = grad_fn(y, batch)
            if g is None:
                return grad, loss
            return toward(grad, storm(g, grad, grad_fn(extras["prev"], batch)[0]) if vr else g, beta), loss

        y, loss = sgd_steps(x, batches, grad_fn, hp, direction, lr=eta)
        return ClientOutput(x - y, {}, {}, {"train_loss": loss})

    def combine(s: MomentumState, got: Contributions, ctx: CombineContext) -> MomentumState:
        if not len(got):
            return s
        # g^{r+1} = Σ_i w_i (x^r − y_i^K)/(ηK);  x^{r+1} = x^r − γ g^{r+1}
        return MomentumState(s.params - server_lr * average(got), per_step_mean(got), s.params, True)

    def publish(s: MomentumState) -> Payload:
        extras = {"g": s.g} if s.started else {}
        return Payload(s.params, {**extras, "prev": s.prev} if vr else extras)

    return ServerStrategy(
        local=local,
        init=lambda x: MomentumState(x, torch.zeros_like(x), x, g0 == "zero"),
        publish=publish,
        combine=combine,
        params=lambda s: s.params,
        metrics=lambda s: {"momentum_norm": float(vec.norm(s.g))} if s.started else {},
    )


@STRATEGIES.register("fedavg_m_vr")
def fedavg_m_vr(beta: Beta = 0.1, server_lr: Annotated[float, Gt(0)] = 1.0, g0: G0 = "first_round") -> ServerStrategy:
    """FedAvg-M-VR: `fedavg_m` with `vr: true` (see fedavg_m for the knobs).

    Args:
        beta: β ∈ (0, 1], the weight of the fresh gradient.
        server_lr: η_g = γ/(ηK).
        g0: How g^0 is set ('first_round' or 'zero').
    """
    return fedavg_m(beta, server_lr, vr=True, g0=g0)
