"""A topology: a graph (or one graph per round) over the nodes, plus the mixing rule over it.

Builders return a ``networkx`` graph on the nodes ``0..n−1`` (static) or a `Schedule`
(time-varying). An edge ``j → i`` of a directed graph means "i receives from j"; an
undirected edge goes both ways. `build_topology` checks that the graph is connected
(for a schedule: the union of its first `window` rounds) unless
``topology.allow_disconnected`` is set, and turns builder errors into ConfigErrors.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import networkx as nx
import scipy.sparse as sp

from fedsim.config.schema import COMPONENTS
from fedsim.errors import ConfigError
from fedsim.registry import MIXING
from fedsim.rng import key

MixingRule = Callable[[nx.Graph], sp.csr_array]


@dataclass(frozen=True)
class TopologyContext:
    """What a graph builder gets from the engine: the node count and the run's seed."""

    num_nodes: int
    seed: int

    def seed_for(self, purpose: str, *ids: int) -> int:
        """Returns a 32-bit seed keyed by (seed, purpose, ids), for networkx's random generators."""
        return key(self.seed, purpose, *ids) % 2**32


@dataclass(frozen=True)
class Schedule:
    """A time-varying topology: the graph of round t, and the rounds that are connected jointly."""

    graph_at: Callable[[int], nx.Graph]
    window: int = 1  # the union of rounds 0..window−1 must be connected


class Topology:
    """The graph of each round and its mixing matrix (cached when the graph is static)."""

    def __init__(self, name: str, num_nodes: int, source: nx.Graph | Schedule, rule: MixingRule):
        self.name = name
        self.num_nodes = num_nodes
        self.source = source
        self.rule = rule
        self._graph = lru_cache(maxsize=2)(self._graph_at)
        self._mixing = lru_cache(maxsize=2)(self._build_mixing)

    @property
    def static(self) -> bool:
        """True when every round uses the same graph."""
        return not isinstance(self.source, Schedule)

    def _graph_at(self, t: int) -> nx.Graph:
        return self.source.graph_at(t) if isinstance(self.source, Schedule) else self.source

    def graph(self, t: int = 0) -> nx.Graph:
        """Returns the graph of round t."""
        return self._graph(0 if self.static else t)

    def _build_mixing(self, t: int) -> sp.csr_array:
        return self.rule(self.graph(t))

    def mixing(self, t: int = 0) -> sp.csr_array:
        """Returns the [n, n] mixing matrix W of round t (row i: the weights node i gives)."""
        return self._mixing(0 if self.static else t)

    def out_neighbors(self, i: int, t: int = 0) -> list[int]:
        """Returns the nodes that receive node i's model in round t, sorted."""
        g = self.graph(t)
        return sorted(g.successors(i) if g.is_directed() else g.neighbors(i))


def check_nodes(graph: nx.Graph, n: int, name: str) -> nx.Graph:
    """Returns `graph` without self-loops; raises ConfigError unless its nodes are exactly 0..n−1."""
    nodes = set(graph.nodes)
    if nodes != set(range(n)):
        extra = sorted(nodes - set(range(n)))[:5]
        missing = sorted(set(range(n)) - nodes)[:5]
        raise ConfigError("topology", f"{name!r} must have the nodes 0..{n - 1} (data.num_clients={n}); "
                          f"unexpected: {extra}, missing: {missing}")
    graph = graph.copy()
    graph.remove_edges_from(list(nx.selfloop_edges(graph)))
    return graph


def is_connected(graph: nx.Graph) -> bool:
    """True when every node can reach every other (weakly, for directed graphs)."""
    if graph.number_of_nodes() <= 1:
        return True
    return nx.is_weakly_connected(graph) if graph.is_directed() else nx.is_connected(graph)


def components(graph: nx.Graph) -> int:
    """Returns the number of (weakly) connected components."""
    return nx.number_weakly_connected_components(graph) if graph.is_directed() else nx.number_connected_components(graph)


def union_graph(schedule: Schedule, n: int) -> nx.Graph:
    """Returns the union of the schedule's graphs over its first `window` rounds."""
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for t in range(max(1, schedule.window)):
        g.add_edges_from(schedule.graph_at(t).edges)
    return g


def sample_connected(make: Callable[[int], nx.Graph], attempts: int = 100) -> nx.Graph:
    """Calls make(attempt) until it returns a connected graph (at most `attempts` times); returns
    the last graph drawn (so a hopeless setting is reported by the connectivity check)."""
    g = make(0)
    for a in range(1, attempts):
        if is_connected(g):
            break
        g = make(a)
    return g


def build_topology(component, num_nodes: int, seed: int) -> Topology:
    """Builds the topology of a resolved `topology` config section (None: the default ring).

    Raises ConfigError for an unknown mixing rule, a rule that does not fit the graph, or a
    disconnected graph without ``allow_disconnected``.
    """
    if component is None:
        component = COMPONENTS["topology"].resolve("topology", None)
    rule = MIXING.get(component.common["mixing"], "topology.mixing").factory
    source = component.build(TopologyContext(num_nodes, seed))
    if isinstance(source, Schedule):
        first = check_nodes(source.graph_at(0), num_nodes, component.name)
        joint = union_graph(source, num_nodes)
    elif isinstance(source, nx.Graph):
        source = first = joint = check_nodes(source, num_nodes, component.name)
    else:
        raise ConfigError("topology.name", f"{component.name!r} returned {type(source).__name__}, not a graph")
    if not component.common["allow_disconnected"] and not is_connected(joint):
        span = "" if joint is first else f" (union of its first {source.window} rounds)"
        raise ConfigError("topology", f"the {component.name!r} graph on {num_nodes} nodes is disconnected{span}: "
                          f"{components(joint)} components; change its knobs or set topology.allow_disconnected=true")
    try:
        rule(first)
    except ValueError as exc:
        raise ConfigError("topology.mixing", str(exc)) from None
    return Topology(component.name, num_nodes, source, rule)

