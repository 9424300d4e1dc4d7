"""Time-varying topologies: a new graph every round, keyed by (seed, name, round)."""
from __future__ import annotations

import math
from typing import Annotated

import networkx as nx

from fedsim.config import Ge
from fedsim.errors import ConfigError
from fedsim.registry import TOPOLOGIES
from fedsim.rng import numpy_rng

from .base import Schedule, TopologyContext


def _log2_rounds(n: int) -> int:
    return max(1, math.ceil(math.log2(max(n, 2))))


@TOPOLOGIES.register("dynamic_regular")
def dynamic_regular(ctx: TopologyContext, degree: Annotated[int, Ge(1)] = 4) -> Schedule:
    """A fresh random d-regular graph every round (DFedSAM's "random" topology, re-drawn per round).

    Args:
        degree: Degree d of every node in every round (n·d even, d < n).
    """
    n = ctx.num_nodes
    if degree >= n or (n * degree) % 2:
        raise ConfigError("topology.degree", f"no {degree}-regular graph on {n} nodes (need d < n and n·d even)")
    return Schedule(lambda t: nx.random_regular_graph(degree, n, seed=ctx.seed_for("topology/dynamic_regular", t)),
                    window=_log2_rounds(n))


@TOPOLOGIES.register("random_matching")
def random_matching(ctx: TopologyContext) -> Schedule:
    """A random perfect matching every round: each node gossips with one random peer.

    With n odd one node is left out. Every round's graph is disconnected; a few rounds
    together connect all nodes.
    """
    n = ctx.num_nodes

    def graph_at(t: int) -> nx.Graph:
        order = numpy_rng(ctx.seed, "topology/matching", t).permutation(n)
        g = nx.empty_graph(n)
        g.add_edges_from(zip(order[0:n - 1:2].tolist(), order[1:n:2].tolist()))
        return g

    return Schedule(graph_at, window=2 * _log2_rounds(n))


@TOPOLOGIES.register("one_peer_exponential")
def one_peer_exponential(ctx: TopologyContext) -> Schedule:
    """One-peer exponential graph: in round t node i sends to i + 2^(t mod ⌈log₂ n⌉) (mod n).

    Ying, Yuan, Chen, Hu, Pan, Yin, NeurIPS 2021, arXiv 2110.13363. Directed, one peer per
    round; with n a power of two, τ = log₂ n consecutive rounds of (½, ½) mixing (every rule
    here gives it) average exactly.
    """
    n = ctx.num_nodes
    tau = _log2_rounds(n)

    def graph_at(t: int) -> nx.DiGraph:
        hop = 2 ** (t % tau)
        g = nx.DiGraph()
        g.add_nodes_from(range(n))
        g.add_edges_from((i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
        return g

    return Schedule(graph_at, window=tau)
