"""ClippedGossip (He, Karimireddy, Jaggi, "Byzantine-robust decentralized learning via
ClippedGossip", arXiv 2202.01545): gossip learning whose merge clips every neighbour's pull.

A node trains on its own data (local SGD), then merges: x_r ← x_r + Σ_j W_rj clip_τ(x_j − x_r)
(fedsim/merge.py `clipped`). Deviation: the paper picks τ per node and round from the
neighbours' distances; here τ is one fixed radius (the paper's analysis also covers a
fixed τ of the order of the honest models' spread).
"""
from __future__ import annotations

from typing import Annotated

from fedsim.config import Gt
from fedsim.decentralized import decentralized, train_params
from fedsim.merge import clipped
from fedsim.registry import STRATEGIES
from fedsim.strategy import GossipStrategy


@STRATEGIES.register("clipped_gossip")
def clipped_gossip(tau: Annotated[float, Gt(0)] = 1.0) -> GossipStrategy:
    """Gossip whose merge clips each neighbour's difference to radius τ (Byzantine-robust).

    Args:
        tau: Clipping radius τ of ‖x_j − x_r‖ (in parameter space).
    """
    return decentralized(train_params(), clipped(tau))
