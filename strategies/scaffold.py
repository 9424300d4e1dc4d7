"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh; ICML 2020; arXiv 1910.06378).

Client i corrects every local step with control variates, y ← y − η (∇F_i(y; ξ) − c_i + c),
then refreshes c_i⁺ = ∇F_i(x) (option I) or c_i⁺ = c_i − c + (x − y_K)/(Kη) (option II) and
uploads (u_i = x − y_K, Δc_i = c_i⁺ − c_i). The server steps x ← x − η_g Σ_i w_i u_i and
c ← c + (1/N) Σ_{i∈S} Δc_i. Two vectors travel each way (x, c down; u_i, Δc_i up).

Checked against the paper's Algorithm 1 as restated in ALGORITHMS.md §2.1 (x ← x + η_g·mean Δy
is x − η_g·mean u here; c ← c + (|S|/N)·mean Δc). Choices the paper leaves open:
* w_i is the protocol's weighting (samples by default; the paper's mean is 'identical'). The
  objective SCAFFOLD solves is still the uniform mean (1/N) Σ_i f_i, because c = mean c_i.
* Option I averages ∇F_i(x; ξ_k) over the job's K batches (one extra pass, K more gradients).
* c_i = 0 for a client's first round, c = 0 at start (the paper's simple initialisation).
"""
from __future__ import annotations

from typing import Annotated, Literal

from fedsim.config import Gt
from fedsim.drift import drift_local, drift_server
from fedsim.registry import STRATEGIES
from fedsim.strategy import Strategy


@STRATEGIES.register("scaffold")
def scaffold(server_lr: Annotated[float, Gt(0)] = 1.0, option: Literal["I", "II"] = "II") -> Strategy:
    """Stochastic controlled averaging: drift-corrected local steps with per-client c_i.

    Args:
        server_lr: Global learning rate η_g (1.0 = apply the mean update as is).
        option: How c_i is refreshed: 'I' (gradient at the server model, one extra pass over
            the job's batches) or 'II' (from the model difference, free).
    """
    return drift_server(drift_local(control=option), server_lr, control=True)
