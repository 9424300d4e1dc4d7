"""DFedSAM and DFedSAM-MGS (Shi, Shen, Wei, Sun, Yuan, Wang, Tao — "Improving the Model
Consistency of Decentralized Federated Learning", ICML 2023, arXiv 2302.04083).

Each node runs K SAM steps from x_i: g = ∇F_i(y; ξ), ε = ρ·g/‖g‖₂, y ← y − η∇F_i(y + ε; ξ)
(same mini-batch ξ, ‖·‖ over all parameters), then gossips Q times, Jacobi-style:
v^q = W v^{q−1}, x_i ← v_i^Q. DFedSAM is Q = 1; DFedSAM-MGS uses Q > 1 (the paper: Q = 4):
``strategy: dfedsam`` with ``protocol.gossip_steps: 4``.

Verified: the abstract (structure, rates with λ → λ^Q for MGS) and the SAM step of the
DFedSAM-style code base (`davda54/sam`, ε = ρg/(‖g‖+1e-12), base optimiser step with the
perturbed gradient). The Algorithm box itself could not be retrieved (docs/algorithms.md).
Deviation: the paper's code uses sample-size-weighted neighbour averages, which are not
doubly stochastic; we use the topology's mixing matrix (Metropolis–Hastings by default).
"""
from __future__ import annotations

from typing import Annotated

from fedsim.config import Ge
from fedsim.decentralized import decentralized, train_params
from fedsim.registry import STRATEGIES
from fedsim.sam import sam
from fedsim.strategy import GossipStrategy


@STRATEGIES.register("dfedsam")
def dfedsam(rho: Annotated[float, Ge(0)] = 0.05) -> GossipStrategy:
    """DFedSAM: SAM local steps (perturbation radius ρ), then ``protocol.gossip_steps`` gossip steps
    (1: DFedSAM; Q > 1: DFedSAM-MGS).

    Args:
        rho: SAM radius ρ (0 gives DFedAvg bit for bit).
    """
    return decentralized(train_params(sam(rho)))
