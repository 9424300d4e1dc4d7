"""Static communication graphs on the nodes 0..n−1; random ones keyed by (seed, name, attempt)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import networkx as nx

from fedsim.config import Ge, Range
from fedsim.errors import ConfigError
from fedsim.registry import TOPOLOGIES

from .base import TopologyContext, sample_connected


@TOPOLOGIES.register("ring")
def ring(ctx: TopologyContext) -> nx.Graph:
    """Cycle: node i talks to i − 1 and i + 1 (mod n)."""
    return nx.cycle_graph(ctx.num_nodes)


@TOPOLOGIES.register("grid")
def grid(ctx: TopologyContext, rows: Annotated[Optional[int], Ge(1)] = None, torus: bool = False) -> nx.Graph:
    """2-D grid (rows × cols = n, row-major node ids); with `torus`, the edges wrap around.

    Args:
        rows: Number of rows (default: the divisor of n closest to √n).
        torus: Wrap rows and columns around (a torus; every node has degree 4).
    """
    n = ctx.num_nodes
    rows = rows or max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if n % rows:
        raise ConfigError("topology.rows", f"{rows} rows do not divide data.num_clients={n}")
    g = nx.grid_2d_graph(rows, n // rows, periodic=torus)
    return nx.convert_node_labels_to_integers(g, ordering="sorted")


@TOPOLOGIES.register("torus")
def torus(ctx: TopologyContext, rows: Annotated[Optional[int], Ge(1)] = None) -> nx.Graph:
    """2-D torus: a grid whose rows and columns wrap around (degree 4).

    Args:
        rows: Number of rows (default: the divisor of n closest to √n).
    """
    return grid(ctx, rows, torus=True)


@TOPOLOGIES.register("exponential")
def exponential(ctx: TopologyContext) -> nx.Graph:
    """Static exponential graph: node i talks to i ± 2^k (mod n) for every 2^k < n."""
    n = ctx.num_nodes
    g = nx.empty_graph(n)
    hops = [2**k for k in range(max(1, (n - 1).bit_length())) if 2**k < n]
    g.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops)
    return g


@TOPOLOGIES.register("random_regular")
def random_regular(ctx: TopologyContext, degree: Annotated[int, Ge(1)] = 4) -> nx.Graph:
    """Random d-regular graph, redrawn (keyed) until connected.

    Args:
        degree: Degree d of every node (n·d must be even, d < n).
    """
    n = ctx.num_nodes
    if degree >= n or (n * degree) % 2:
        raise ConfigError("topology.degree", f"no {degree}-regular graph on {n} nodes (need d < n and n·d even)")
    return sample_connected(lambda a: nx.random_regular_graph(degree, n, seed=ctx.seed_for("topology/regular", a)))


@TOPOLOGIES.register("erdos_renyi")
def erdos_renyi(ctx: TopologyContext, p: Annotated[Optional[float], Range(0.0, 1.0, open_lo=True)] = None) -> nx.Graph:
    """Erdős–Rényi G(n, p), redrawn (keyed) until connected.

    Args:
        p: Edge probability (default 2·ln(n)/n, comfortably above the connectivity threshold).
    """
    n = ctx.num_nodes
    p = p if p is not None else min(1.0, 2 * math.log(max(n, 2)) / n)
    return sample_connected(lambda a: nx.gnp_random_graph(n, p, seed=ctx.seed_for("topology/erdos_renyi", a)))


@TOPOLOGIES.register("watts_strogatz")
def watts_strogatz(
    ctx: TopologyContext,
    k: Annotated[int, Ge(2)] = 4,
    p: Annotated[float, Range(0.0, 1.0)] = 0.1,
) -> nx.Graph:
    """Watts–Strogatz small world: a ring lattice with k neighbours, each edge rewired with prob. p.

    Args:
        k: Each node starts joined to its k nearest ring neighbours (k/2 per side).
        p: Rewiring probability (0: ring lattice; 1: nearly random).
    """
    if k >= ctx.num_nodes:
        raise ConfigError("topology.k", f"k={k} must be below data.num_clients={ctx.num_nodes}")
    return sample_connected(
        lambda a: nx.watts_strogatz_graph(ctx.num_nodes, k, p, seed=ctx.seed_for("topology/watts_strogatz", a))
    )


@TOPOLOGIES.register("star")
def star(ctx: TopologyContext) -> nx.Graph:
    """Star: node 0 is the hub, every other node talks only to it."""
    return nx.star_graph(ctx.num_nodes - 1) if ctx.num_nodes > 1 else nx.empty_graph(1)


@TOPOLOGIES.register("complete")
def complete(ctx: TopologyContext) -> nx.Graph:
    """Complete graph: every node talks to every other."""
    return nx.complete_graph(ctx.num_nodes)


@TOPOLOGIES.register("edge_list")
def edge_list(ctx: TopologyContext, path: str, directed: bool = False) -> nx.Graph:
    """A graph read from a text file with one edge "u v" per line (integer node ids, '#' comments).

    Args:
        path: The edge-list file; node ids must be 0..n−1 (n = data.num_clients).
        directed: Read "u v" as u → v (v receives from u) instead of an undirected edge.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("topology.path", f"edge-list file not found: {file}")
    g = nx.DiGraph() if directed else nx.Graph()
    g.add_nodes_from(range(ctx.num_nodes))
    try:
        g.add_edges_from(nx.read_edgelist(file, nodetype=int, create_using=type(g), data=False).edges)
    except (TypeError, ValueError) as exc:
        raise ConfigError("topology.path", f"{file}: not an edge list of integer node ids ({exc})") from None
    return g
