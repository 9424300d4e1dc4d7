"""Gossip learning (Ormándi, Hegedűs, Jelasity, Concurrency Computat. 25(4) 2013, arXiv 1109.1396)
with plain or variance-corrected averaging (VCA: Tian, Al-Ars, Kitsak, Hofstee, arXiv 2404.04616).

A node trains on its own data, pushes its model to its neighbours and, once its buffer
holds enough received models w_1..w_m, merges: a = α·w_self + (1 − α)·mean_j w_j (α the
protocol's self weight; the VCA code: α = ½). VCA then rescales each parameter tensor of a
around its mean so that Var(a_ℓ) = mean_j Var(w_j,ℓ), undoing the variance that averaging
independently initialised models destroys. Verified against the authors' code
(docs/algorithms.md); as in their PyTorch port every tensor is corrected (biases too), but
with no ε in the ratio and zero-variance tensors left as they are.
"""
from __future__ import annotations

from fedsim.decentralized import decentralized, train_params
from fedsim.merge import mix, variance_corrected
from fedsim.registry import STRATEGIES
from fedsim.strategy import GossipStrategy


@STRATEGIES.register("gossip")
def gossip(variance_correction: bool = False) -> GossipStrategy:
    """Gossip learning: local SGD, then merge the received models (plain or VCA).

    Args:
        variance_correction: Rescale each merged tensor to the received models' mean variance (VCA).
    """
    return decentralized(train_params(), variance_corrected if variance_correction else mix)
