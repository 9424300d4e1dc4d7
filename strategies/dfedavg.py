"""DFedAvg and DFedAvgM (Sun, Li, Wang — "Decentralized Federated Averaging", IEEE TPAMI 2022,
arXiv 2104.11375).

Every node i runs K local SGD steps from its model x_i (DFedAvgM: heavy-ball momentum θ,
y^{k+1} = y^k − η∇F_i(y^k) + θ(y^k − y^{k−1}), restarted every round), then gossips with its
neighbours: x_i ← Σ_j w_ij y_j^K. With K = 1 (``local.steps: 1``) this is D-PSGD (Lian et
al., NeurIPS 2017, arXiv 1705.09056) in its adapt-then-combine form.
"""
from __future__ import annotations

from typing import Annotated

from fedsim.config import Range
from fedsim.decentralized import decentralized, train_params
from fedsim.registry import STRATEGIES
from fedsim.strategy import GossipStrategy


@STRATEGIES.register("dfedavg")
def dfedavg() -> GossipStrategy:
    """Decentralized FedAvg: local SGD (``local.*``), then gossip with the topology's mixing matrix
    (``protocol.gossip_steps`` times per round: the paper's 1, or more for multiple gossip steps)."""
    return decentralized(train_params())


@STRATEGIES.register("dfedavgm")
def dfedavgm(momentum: Annotated[float, Range(0.0, 1.0, open_hi=True)] = 0.9) -> GossipStrategy:
    """DFedAvg with local heavy-ball momentum θ (overrides ``local.momentum``).

    Args:
        momentum: θ, the local momentum; the buffer restarts at zero every round.
    """
    return decentralized(train_params(momentum=momentum))
