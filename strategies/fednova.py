"""FedNova (Wang, Liu, Liang, Joshi — "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020, arXiv 2007.07481).

Client i runs τ_i local steps and reports u_i = x − y_i plus ‖a_i‖₁, the ℓ1 norm of its
step-weight vector (τ_i for plain SGD; [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)]/(1 − ρ) with local
momentum ρ). The server averages normalised updates and rescales by the effective number
of steps: x ← x − η_g τ_eff Σ_i w_i u_i / ‖a_i‖₁, τ_eff = Σ_i w_i ‖a_i‖₁ (eq. 9, w_i = p_i).
With equal τ_i this is FedAvg; with unequal τ_i it removes FedAvg's bias toward clients
that take more steps.
"""
from __future__ import annotations

from typing import Annotated

import torch

from fedsim import vec
from fedsim.blocks import fl_server, sgd
from fedsim.config import Gt
from fedsim.local import local_lr, sgd_steps
from fedsim.registry import STRATEGIES
from fedsim.contributions import Contributions
from fedsim.strategy import Batches, ClientOutput, ClientState, GradFn, LocalHP, Payload, ServerStrategy, Tensor


def step_weight_norm(steps: int, momentum: float) -> float:
    """Returns ‖a‖₁ for `steps` local SGD steps with heavy-ball momentum ρ (τ when ρ = 0)."""
    if not momentum:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def nova_local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
    """K local SGD steps; uploads u = x − y_K and ‖a‖₁ (one scalar) as the extra 'a_norm'."""
    y, loss = sgd_steps(payload.params, batches, grad_fn, hp, lr=local_lr(payload, hp))
    a = torch.as_tensor(step_weight_norm(batches.num_steps, hp.momentum), dtype=torch.float32)  # a job's own ρ: a tensor
    return ClientOutput(payload.params - y, {}, {"a_norm": a}, {"train_loss": loss})


def normalized_average(c: Contributions) -> Tensor:
    """Returns τ_eff Σ_i w_i u_i / ‖a_i‖₁ with τ_eff = Σ_i w_i ‖a_i‖₁ (weights as the protocol set them)."""
    a = [max(ai, 1e-12) for ai in c.extras["a_norm"].tolist()]
    w = c.weights.tolist()
    tau_eff = sum(wi * ai for wi, ai in zip(w, a))
    return tau_eff * vec.weighted_sum(c.updates, [wi / ai for wi, ai in zip(w, a)])


@STRATEGIES.register("fednova")
def fednova(server_lr: Annotated[float, Gt(0)] = 1.0) -> ServerStrategy:
    """Normalised averaging: each client's update is divided by its number of local steps.

    Args:
        server_lr: Global learning rate η_g (1.0 as in the paper's experiments).
    """
    return fl_server(nova_local, reduce=normalized_average, transform=sgd(server_lr))
