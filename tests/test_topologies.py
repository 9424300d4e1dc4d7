"""Topologies and mixing matrices: stochasticity, exact averaging, contraction by λ^Q, known spectra."""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from fedsim.config.schema import COMPONENTS
from fedsim.errors import ConfigError
from fedsim.merge import mix
from fedsim.params import ParamLayout
from fedsim.registry import MIXING, TOPOLOGIES
from fedsim.topologies.base import build_topology
from fedsim.topologies.mixing import as_tensor, contraction, is_doubly_stochastic, restrict

STATIC = {
    "ring": {}, "grid": {}, "torus": {}, "exponential": {}, "random_regular": {"degree": 3},
    "erdos_renyi": {}, "watts_strogatz": {}, "star": {}, "complete": {},
}
SCHEDULES = {"dynamic_regular": {"degree": 3}, "random_matching": {}, "one_peer_exponential": {}}


def topology(name: str, n: int, seed: int = 0, **kw):
    return build_topology(COMPONENTS["topology"].resolve("topology", {"name": name, **kw}), n, seed)


def test_every_registered_builder_is_covered():
    assert set(TOPOLOGIES.names()) == set(STATIC) | set(SCHEDULES) | {"edge_list"}
    assert set(MIXING.names()) == {"metropolis_hastings", "uniform", "max_degree"}


@pytest.mark.parametrize("rule", ["metropolis_hastings", "max_degree"])
@pytest.mark.parametrize("name", sorted(STATIC) + ["dynamic_regular", "random_matching"])
def test_undirected_mixing_is_symmetric_doubly_stochastic(name, rule):
    topo = topology(name, 16, mixing=rule, **{**STATIC, **SCHEDULES}[name])
    for t in range(3):
        w = topo.mixing(t).toarray()
        assert np.array_equal(w, w.T)
        assert is_doubly_stochastic(w)
        adj = nx.to_numpy_array(topo.graph(t), nodelist=range(16)) > 0
        assert not (w[~adj & ~np.eye(16, dtype=bool)]).any()  # weight only on edges


@pytest.mark.parametrize("name", ["ring", "torus", "exponential", "complete", "random_regular", "dynamic_regular"])
def test_uniform_weights_on_regular_graphs(name):
    w = topology(name, 16, mixing="uniform", **{**STATIC, **SCHEDULES}.get(name, {})).mixing(0).toarray()
    deg = (w > 0).sum(1) - 1
    assert is_doubly_stochastic(w) and np.array_equal(w, w.T)
    assert np.allclose(w[w > 0], np.repeat(1.0 / (deg + 1), deg + 1))


def test_uniform_weights_refused_on_irregular_graph():
    with pytest.raises(ConfigError, match=r"topology\.mixing: 'uniform' weights need a regular graph"):
        topology("star", 8, mixing="uniform")


def test_unknown_mixing_rule_names_the_key():
    with pytest.raises(ConfigError, match=r"topology\.mixing: unknown mixing rule 'metropolis'"):
        topology("ring", 8, mixing="metropolis")


def test_known_spectra():
    # ring with MH weights (1/3 each): eigenvalues 1/3 + 2/3 cos(2πk/n); λ = that at k = 1 for even n
    assert contraction(topology("ring", 100).mixing()) == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / 100), abs=1e-12)
    # published values for n = 100 (checked against the papers' tables)
    assert contraction(topology("torus", 100).mixing()) == pytest.approx(0.9236, abs=1e-4)
    assert contraction(topology("exponential", 100).mixing()) == pytest.approx(0.7333, abs=1e-4)
    assert contraction(topology("complete", 100).mixing()) == pytest.approx(0.0, abs=1e-12)
    # sparser graph, slower mixing
    gaps = [1 - contraction(topology(n, 64).mixing()) for n in ("ring", "torus", "exponential", "complete")]
    assert gaps == sorted(gaps)


@pytest.mark.parametrize("name", sorted(STATIC) + sorted(SCHEDULES))
def test_gossip_keeps_the_average_and_contracts_by_lambda_power_q(name):
    topo = topology(name, 16, seed=3, **{**STATIC, **SCHEDULES}[name])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    layout = ParamLayout(("w",), ((40,),))
    w = topo.mixing(0)
    lam = contraction(w)
    wt = as_tensor(w, torch.float64)
    own = torch.arange(16)
    y = x
    for q in range(1, 6):
        y = mix(y, wt, own, layout)
        assert torch.allclose(y.mean(0), x.mean(0), atol=1e-12, rtol=0)  # the average is preserved
        before = torch.linalg.matrix_norm(x - x.mean(0))
        after = torch.linalg.matrix_norm(y - y.mean(0))
        assert after <= lam**q * before * (1 + 1e-12) + 1e-12


def test_sparse_operator_for_large_n_matches_dense():
    topo = topology("ring", 300)
    x = torch.randn(300, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sparse = as_tensor(topo.mixing(), torch.float64)
    assert sparse.layout == torch.sparse_csr
    dense = torch.as_tensor(topo.mixing().toarray())
    assert torch.allclose(sparse @ x, dense @ x, atol=1e-14, rtol=0)
    assert torch.allclose((sparse @ x).mean(0), x.mean(0), atol=1e-12, rtol=0)


def test_one_peer_exponential_averages_exactly_in_log2_n_rounds():
    topo = topology("one_peer_exponential", 16)
    prod = np.eye(16)
    for t in range(4):
        w = topo.mixing(t).toarray()
        assert is_doubly_stochastic(w) and (w > 0).sum(1).tolist() == [2] * 16  # itself and one peer
        prod = w @ prod
    assert np.array_equal(prod, np.full((16, 16), 1 / 16))  # exact in binary floating point
    assert not np.array_equal(topo.mixing(0).toarray(), topo.mixing(0).toarray().T)  # directed


def test_random_matching_is_one_peer_per_round_and_keyed():
    a, b, c = topology("random_matching", 9, seed=0), topology("random_matching", 9, seed=0), topology("random_matching", 9, seed=1)
    degrees = [d for _, d in a.graph(0).degree()]
    assert sorted(degrees) == [0] + [1] * 8  # 9 nodes: four pairs, one left out
    assert sorted(a.graph(5).edges) == sorted(b.graph(5).edges)
    assert sorted(a.graph(5).edges) != sorted(a.graph(6).edges) or sorted(a.graph(5).edges) != sorted(c.graph(5).edges)


def test_random_graphs_are_keyed_by_seed():
    same = [sorted(topology("random_regular", 20, seed=s, degree=3).graph().edges) for s in (4, 4, 5)]
    assert same[0] == same[1] and same[0] != same[2]


def test_disconnected_graph_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"topology: the 'erdos_renyi' graph on 30 nodes is disconnected"):
        topology("erdos_renyi", 30, p=0.01)
    path = tmp_path / "edges.txt"
    path.write_text("# two triangles\n0 1\n1 2\n2 0\n3 4\n4 5\n5 3\n")
    with pytest.raises(ConfigError, match="2 components"):
        topology("edge_list", 6, path=str(path))
    topo = topology("edge_list", 6, path=str(path), allow_disconnected=True)
    assert is_doubly_stochastic(topo.mixing())


def test_edge_list_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"topology\.path: edge-list file not found"):
        topology("edge_list", 4, path=str(tmp_path / "missing.txt"))
    path = tmp_path / "edges.txt"
    path.write_text("0 1\n1 7\n")
    with pytest.raises(ConfigError, match=r"must have the nodes 0\.\.3 .*unexpected: \[7\]"):
        topology("edge_list", 4, path=str(path))


def test_bad_builder_knobs_are_config_errors():
    with pytest.raises(ConfigError, match=r"topology\.degree: no 3-regular graph on 9 nodes"):
        topology("random_regular", 9, degree=3)
    with pytest.raises(ConfigError, match=r"topology\.rows: 3 rows do not divide"):
        topology("grid", 16, rows=3)


def test_restrict_drops_inactive_nodes_and_stays_doubly_stochastic():
    w = topology("exponential", 12).mixing()
    active = np.ones(12, dtype=bool)
    active[[2, 7]] = False
    r = restrict(w, active).toarray()
    assert is_doubly_stochastic(r) and np.array_equal(r, r.T)
    assert np.array_equal(r[[2, 7]], np.eye(12)[[2, 7]])  # inactive nodes keep their model
    keep = np.ix_(active, active)
    off = ~np.eye(12, dtype=bool)[keep]
    assert np.array_equal(r[keep][off], w.toarray()[keep][off])  # other links unchanged
