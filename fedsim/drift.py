"""Client-drift corrections shared by the momentum and control-variate strategies.

Cheng, Huang, Wu, Yuan (ICLR 2024, arXiv 2306.16504) extend FedAvg and SCAFFOLD with one
local step direction, here with every piece optional:

    d = β (∇F_i(y; ξ) − c_i + c) + (1 − β) (g + [∇F_i(y; ξ) − ∇F_i(x^{r−1}; ξ)]_VR)

(SCAFFOLD: β = 1; FedAvg-M: no c_i, c; the VR forms add the bracket, a STORM correction
with the same sample ξ at the previous global model), and one server rule:
x ← x − η_g Σ_i w_i u_i, g ← Σ_i w_i u_i / (η K_i), c ← c + (1/N) Σ_{i∈S} (c_i⁺ − c_i).
FedAvg-M's direction is FedCM's (checked against FedCM's released code). The paper's
Algorithm boxes could not be read here, so SCAFFOLD-M's c_i⁺ rule and the VR bracket are
implemented as recalled, not checked (strategies/fedavg_m.py and scaffold_m.py say what
they do and do not do).

Units: the server does not know the clients' learning rate η, so it keeps and publishes
ηg = Σ_i w_i u_i / K_i (the mean model displacement per local step) and each client divides
by its own η. With one η and one K this is exactly the paper's
g^{r+1} = (1/(ηK|S|)) Σ_{i∈S} (x^r − y_i^K) (with w_i = 1/|S|), and the paper's global
learning rate γ (x^{r+1} = x^r − γ g^{r+1}) is γ = η_g·η·K: η_g = 1 is plain averaging.
"""
from __future__ import annotations

from typing import Annotated, Literal, NamedTuple, Optional, Sequence

import torch

from . import vec
from .config.checks import Range
from .blocks import weighted_sum
from .local import local_lr, sgd_steps
from .strategy import Batch, Batches, ClientOutput, ClientState, CombineContext, GradFn, LocalHP, LocalUpdate, Msg
from .strategy import Payload, Strategy, Tensor

# How a client refreshes its control variate c_i:
#   "I": ∇F_i at the received model x, averaged over the job's batches (K extra gradients);
#   "II": c_i − c + (x − y_K)/(Kη) (SCAFFOLD's free option);
#   "path": the mean of the K fresh gradients ∇F_i(y_k; ξ_k) of this job (SCAFFOLD-M).
ControlOption = Literal["I", "II", "path"]
Beta = Annotated[float, Range(0.0, 1.0, open_lo=True)]  # β ∈ (0, 1], the weight of the fresh gradient
# g^0: 'zero' (g^0 = 0, so the first ~1/β rounds move by about β) or 'first_round' (round 0
# runs without momentum and sets g^1 from its updates, like STORM's d_0 = ∇f(x_0; ξ_0)).
G0 = Literal["zero", "first_round"]


class DriftState(NamedTuple):
    """Server state: x^r and, where the strategy uses them, ηg^r, c and x^{r−1}."""

    params: Tensor
    g: Optional[Tensor] = None  # η·g^r, the momentum (gradient estimate) in per-step units
    c: Optional[Tensor] = None  # server control variate c = (1/N) Σ_i c_i
    prev: Optional[Tensor] = None  # x^{r−1}, for the variance-reduced forms


def drift_local(beta: float = 1.0, control: ControlOption | None = None, vr: bool = False) -> LocalUpdate:
    """Returns the client part: K steps along d (module docstring), upload u = x − y_K and,
    with `control`, Δc_i = c_i⁺ − c_i as extra 'dc' and c_i⁺ as the new state."""

    def local(payload: Payload, state: ClientState, batches: Batches, grad_fn: GradFn, hp: LocalHP) -> ClientOutput:
        x, extras = payload.params, payload.extras
        eta = local_lr(payload, hp)
        shift = extras["c"] - state["c"] if control else None  # c − c_i
        g = extras["g"] / eta if "g" in extras else None
        total = [0.0]  # Σ_k ∇F_i(y_k; ξ_k), for control="path"

        def direction(y: Tensor, batch: Batch, grad_fn: GradFn, k: int) -> tuple[Tensor, Tensor]:
            grad, loss = grad_fn(y, batch)
            if control == "path":
                total[0] = total[0] + grad
            d = grad if shift is None else grad + shift
            if g is not None:
                # VR: STORM-style correction with the same sample ξ at the previous global model
                fresh = g + grad - grad_fn(extras["prev"], batch)[0] if vr else g
                d = beta * d + (1 - beta) * fresh
            return d, loss

        y, loss = sgd_steps(x, batches, grad_fn, hp, direction, lr=eta)
        u = x - y
        if control is None:
            return ClientOutput(u, {}, {}, {"train_loss": loss})
        k = max(batches.num_steps, 1)
        if control == "II":
            c_new = state["c"] - extras["c"] + u / (k * eta)
        elif control == "I":
            c_new = sum(grad_fn(x, batches[j])[0] for j in range(batches.num_steps)) / k
        else:
            c_new = total[0] / k
        return ClientOutput(u, {"c": c_new}, {"dc": c_new - state["c"]}, {"train_loss": loss})

    return local


def per_step_mean(msgs: Sequence[Msg]) -> Tensor:
    """Returns Σ_i w_i u_i / K_i: the weighted mean model displacement per local step (= ηg)."""
    return vec.weighted_sum([m.update for m in msgs], [m.weight / max(m.num_steps, 1) for m in msgs])


def control_step(c: Tensor, msgs: Sequence[Msg], num_clients: int) -> Tensor:
    """Returns c + (1/N) Σ_{i∈S} Δc_i, which keeps c = (1/N) Σ_i c_i over the population."""
    return c + vec.weighted_sum([m.extras["dc"] for m in msgs], [1.0 / num_clients] * len(msgs))


def drift_server(
    local: LocalUpdate,
    server_lr: float = 1.0,
    momentum: bool = False,
    control: bool = False,
    vr: bool = False,
    g0: G0 = "zero",
) -> Strategy:
    """Returns a server-based strategy: x ← x − η_g Σ w_i u_i, plus the momentum ηg (with
    `momentum`), the control variate c (with `control`) and x^{r−1} (with `vr`), all published
    to clients as payload extras 'g', 'c', 'prev'. With g0='first_round' no g is sent before
    the first aggregation, so clients step with β = 1 (no momentum) in round 0 and g^1 is a
    plain gradient estimate. An empty aggregation changes nothing."""
    reduce = weighted_sum()

    def init(params: Tensor) -> DriftState:
        zero = torch.zeros_like(params)
        g = zero if momentum and g0 == "zero" else None
        return DriftState(params, g, zero if control else None, params if vr else None)

    def publish(state: DriftState) -> Payload:
        extras = {"g": state.g, "c": state.c, "prev": state.prev}
        return Payload(state.params, {k: v for k, v in extras.items() if v is not None})

    def combine(state: DriftState, msgs: Sequence[Msg], ctx: CombineContext) -> DriftState:
        if not msgs:
            return state
        return DriftState(
            state.params - server_lr * reduce(msgs),
            per_step_mean(msgs) if momentum else None,
            control_step(state.c, msgs, ctx.num_clients) if control else None,
            state.params if vr else None,
        )

    def metrics(state: DriftState) -> dict[str, float]:
        out = {}
        if state.g is not None:
            out["momentum_norm"] = float(vec.norm(state.g))
        if state.c is not None:
            out["control_norm"] = float(vec.norm(state.c))
        return out

    return Strategy(
        local=local,
        init=init,
        publish=publish,
        combine=combine,
        params=lambda s: s.params,
        client_state=(lambda p: {"c": torch.zeros_like(p)}) if control else None,
        metrics=metrics,
    )
