"""Client-drift pieces: the corrections SCAFFOLD, FedAvg-M and SCAFFOLD-M compose.

Each piece is one line of an algorithm box, as a pure function over flat tensors, so that
``strategies/scaffold.py``, ``fedavg_m.py`` and ``scaffold_m.py`` read against their papers:

* `corrected` — SCAFFOLD's control-variate correction of a local gradient, g − c_i + c;
* `toward` — client momentum toward the server's estimate, β d + (1 − β) g
  (FedCM / FedAvg-M, SCAFFOLD-M);
* `storm` — the STORM correction with the same sample at the previous global model,
  g + ∇F(y; ξ) − ∇F(x^{r−1}; ξ) (the -VR forms);
* `gradient_at` (option I), `from_displacement` (option II) and the mean of a job's path
  gradients (SCAFFOLD-M) — ways to refresh a client's control variate c_i;
* `per_step_mean` and `control_step` — the server's momentum estimate and control variate.

FedAvg-M's direction is FedCM's (checked against FedCM's released code). The momentum
paper's Algorithm boxes could not be read, so SCAFFOLD-M's c_i⁺ rule and the STORM (VR)
bracket are implemented as recalled, not checked (strategies/fedavg_m.py and scaffold_m.py
say what they do and do not do).

Units: the server does not know the clients' learning rate η, so it keeps and publishes
ηg = Σ_i w_i u_i / K_i (the mean model displacement per local step; `per_step_mean`) and
each client divides by its own η. With one η and one K this is exactly
g^{r+1} = (1/(ηK|S|)) Σ_{i∈S} (x^r − y_i^K) (with w_i = 1/|S|), and a paper's global learning
rate γ (x^{r+1} = x^r − γ g^{r+1}) is γ = η_g·η·K: η_g = 1 is plain averaging.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np

from . import vec
from .config.checks import Range
from .contributions import Contributions
from .strategy import Batches, GradFn, Tensor
from .state_types import checkpointable

Beta = Annotated[float, Range(0.0, 1.0, open_lo=True)]  # β ∈ (0, 1], the weight of the fresh gradient
# g^0: 'zero' (g^0 = 0, so the first ~1/β rounds move by about β) or 'first_round' (round 0
# runs without momentum and sets g^1 from its updates, like STORM's d_0 = ∇f(x_0; ξ_0)).
G0 = Literal["zero", "first_round"]


def corrected(grad: Tensor, shift: Tensor) -> Tensor:
    """Returns SCAFFOLD's corrected gradient g + (c − c_i), `shift` = c − c_i (computed once per job)."""
    return grad + shift


def toward(d: Tensor, g: Tensor, beta: float) -> Tensor:
    """Returns β d + (1 − β) g: a step direction pulled toward the server's estimate g."""
    return beta * d + (1 - beta) * g


def storm(g: Tensor, grad: Tensor, grad_prev: Tensor) -> Tensor:
    """Returns g + ∇F(y; ξ) − ∇F(x^{r−1}; ξ): STORM's correction of the estimate g with the same sample."""
    return g + grad - grad_prev


def gradient_at(x: Tensor, batches: Batches, grad_fn: GradFn) -> Tensor:
    """Returns the mean of ∇F(x; ξ_k) over the job's K batches (SCAFFOLD's option I: one extra pass)."""
    k = max(batches.num_steps, 1)
    return sum(grad_fn(x, batches[j])[0] for j in range(batches.num_steps)) / k


def from_displacement(c_i: Tensor, c: Tensor, u: Tensor, steps: int, lr: Tensor | float) -> Tensor:
    """Returns c_i − c + u / (K η): SCAFFOLD's option II (free: from the model displacement u = x − y_K)."""
    return c_i - c + u / (max(steps, 1) * lr)


def per_step_mean(got: Contributions) -> Tensor:
    """Returns Σ_i w_i u_i / K_i: the weighted mean model displacement per local step (= ηg)."""
    return vec.weighted_sum(got.updates, (got.weights / np.maximum(got.num_steps, 1)).tolist())


def control_step(c: Tensor, got: Contributions, num_clients: int) -> Tensor:
    """Returns c + (1/N) Σ_{i∈S} Δc_i (extra 'dc'), which keeps c = (1/N) Σ_i c_i over the population."""
    return c + vec.weighted_sum(got.extras["dc"], [1.0 / num_clients] * len(got))


__all__ = ["Beta", "G0", "control_step", "corrected", "from_displacement", "gradient_at", "per_step_mean", "storm",
           "toward"]
