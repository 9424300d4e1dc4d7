"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh; ICML 2020; arXiv 1910.06378).

Client i corrects every local step with control variates, y ← y − η (∇F_i(y; ξ) − c_i + c),
then refreshes c_i⁺ = ∇F_i(x) (option I) or c_i⁺ = c_i − c + (x − y_K)/(Kη) (option II) and
uploads (u_i = x − y_K, Δc_i = c_i⁺ − c_i). The server steps x ← x − η_g Σ_i w_i u_i and
c ← c + (1/N) Σ_{i∈S} Δc_i. Two vectors travel each way (x, c down; u_i, Δc_i up).

Checked against the paper's Algorithm 1 (its x ← x + η_g·mean Δy is x − η_g·mean u here;
c ← c + (|S|/N)·mean Δc). Lines of the box are marked in the code below. Choices the paper leaves open:
* w_i is the protocol's weighting (samples by default; the paper's mean is 'identical'). The
  objective SCAFFOLD solves is still the uniform mean (1/N) Σ_i f_i, because c = mean c_i.
* Option I averages ∇F_i(x; ξ_k) over the job's K batches (one extra pass, K more gradients).
* c_i = 0 for a client's first round, c = 0 at start (the paper's simple initialisation).
"""
from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import torch

from fedsim import vec
from fedsim.blocks import weighted_sum
from fedsim.config import Gt
from fedsim.contributions import Contributions
from fedsim.drift import control_step, corrected, from_displacement, gradient_at
from fedsim.local import local_lr, sgd_steps
from fedsim.registry import STRATEGIES
from fedsim.strategy import ClientOutput, CombineContext, Payload, ServerStrategy, Tensor
from fedsim.state_types import checkpointable


@checkpointable
class ScaffoldState(NamedTuple):
    """Server state: the global model x and the server control variate c."""

    params: Tensor
    c: Tensor


@STRATEGIES.register("scaffold")
def scaffold(server_lr: Annotated[float, Gt(0)] = 1.0, option: Literal["I", "II"] = "II") -> ServerStrategy:
    """Stochastic controlled averaging: drift-corrected local steps with per-client c_i.

    Args:
        server_lr: Global learning rate η_g (1.0 = apply the mean update as is).
        option: How c_i is refreshed: 'I' (gradient at the server model, one extra pass over
            the job's batches) or 'II' (from the model difference, free).
    """
    average = weighted_sum()

    def local(payload: Payload, state, batches, grad_fn, hp) -> ClientOutput:
        x, c, c_i = payload.params, payload.extras["c"], state["c"]
        eta, shift = local_lr(payload, hp), c - c_i

        def direction(y, batch, grad_fn, k):  # line 10: y ← y − η (g_i(y) − c_i + c)
            grad, loss = grad_fn(y, batch)
            return corrected(grad, shift), loss

        y, loss = sgd_steps(x, batches, grad_fn, hp, direction, lr=eta)
        u = x - y  # line 13 sends Δy = −u
        if option == "I":  # line 12
            c_new = gradient_at(x, batches, grad_fn)
        else:
            c_new = from_displacement(c_i, c, u, batches.num_steps, eta)
        return ClientOutput(u, {"c": c_new}, {"dc": c_new - c_i}, {"train_loss": loss})

    def combine(s: ScaffoldState, got: Contributions, ctx: CombineContext) -> ScaffoldState:
        if not len(got):
            return s
        # lines 16-17: x ← x + η_g·mean Δy, c ← c + (1/N) Σ Δc_i
        return ScaffoldState(s.params - server_lr * average(got), control_step(s.c, got, ctx.num_clients))

    return ServerStrategy(
        local=local,
        init=lambda x: ScaffoldState(x, torch.zeros_like(x)),
        publish=lambda s: Payload(s.params, {"c": s.c}),
        combine=combine,
        params=lambda s: s.params,
        client_state=lambda x: {"c": torch.zeros_like(x)},
        metrics=lambda s: {"control_norm": float(vec.norm(s.c))},
    )
