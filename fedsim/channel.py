"""Gossip channels: what a synchronous gossip step sends when the messages are not dense models.

A decentralized strategy may carry a `Channel` (``Strategy.channel``). The synchronous
decentralized protocol then runs each of its Q gossip steps as ``channel.step`` instead of
``merge``, and keeps the channel's per-node state in its own state (so it is checkpointed):

* ``init(models [n, d]) -> state``: the initial channel state (a dict of ``[n, d]`` stacks,
  e.g. CHOCO's public copies x̂), from the initial node stack;
* ``step(models, weights, state, senders, key, layout) -> (models, state, sizes)``: one
  gossip step of all n nodes. ``senders [n]`` (bool) marks the nodes with at least one
  out-link this step (the others send nothing and must not change their channel state),
  ``key`` keys the step's compression randomness, and ``sizes [n]`` (int) is the encoded
  size in bytes of the message each node sent to every one of its out-neighbours (0 for
  non-senders);
* ``static_graph``: True when receivers keep state per sender (CHOCO's x̂_j), which is only
  consistent when the neighbours do not change; the protocol then refuses time-varying
  topologies.

`link_bytes` turns the per-node message sizes into the bytes each node sends and receives.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

Tensor = torch.Tensor
ChannelStep = Callable[[Tensor, Tensor, Any, np.ndarray, int, Any], "tuple[Tensor, Any, np.ndarray]"]


class Channel(NamedTuple):
    """A stateful gossip exchange; see the module docstring."""

    init: Callable[[Tensor], Any]
    step: ChannelStep
    static_graph: bool = False


def link_bytes(w: sp.csr_array, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (bytes each node receives, bytes each node sends) in one gossip step with W when
    node j sends a message of ``sizes[j]`` bytes to each of its out-neighbours (the nonzero
    off-diagonal entries of column j)."""
    off = (w - sp.diags_array(w.diagonal(), shape=w.shape)).tocsr()
    links = (off != 0).astype(np.int64)  # links[i, j] = 1: i receives from j
    sizes = np.asarray(sizes, dtype=np.int64)
    return links @ sizes, np.asarray(links.sum(axis=0)).ravel() * sizes
