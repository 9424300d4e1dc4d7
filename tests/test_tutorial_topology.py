"""Executes docs/tutorial-topology.md: its topology file and config must work as the page says."""
from __future__ import annotations

import subprocess

import networkx as nx
import numpy as np
import pytest
import yaml

from .conftest import ROOT, fedsim_cmd, tutorial_plugin



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with the page's plugin file and config (rounds shortened), the plugin imported."""
    from fedsim.config.load import import_plugin

    path = tmp_path_factory.mktemp("topology_tutorial")
    cfg = tutorial_plugin("tutorial-topology.md", path, "my_topology.py")
    cfg["run"].update(rounds=6, eval_every=3, progress=False, torch_threads=1)  # one thread: fast on a busy machine
    (path / "cliques.yaml").write_text(yaml.safe_dump(cfg))
    import_plugin("my_topology.py", path)
    return path


def reference_mh(graph: nx.Graph) -> np.ndarray:
    """Metropolis–Hastings weights written out densely: w_ij = 1 / (1 + max(deg_i, deg_j))."""
    n = graph.number_of_nodes()
    w = np.zeros((n, n))
    for i, j in graph.edges:
        w[i, j] = w[j, i] = 1.0 / (1 + max(graph.degree(i), graph.degree(j)))
    return w + np.diag(1.0 - w.sum(1))


def test_graph_is_a_ring_of_cliques(folder):
    from fedsim.registry import TOPOLOGIES
    from fedsim.topologies.base import TopologyContext

    g = TOPOLOGIES.get("ring_of_cliques").factory(TopologyContext(16, 0), cliques=4)
    assert sorted(g.nodes) == list(range(16))
    assert g.number_of_edges() == 4 * 6 + 4  # four K4 plus four bridges
    for c in range(4):  # complete inside, one bridge out of the last node to the next clique
        inside = range(4 * c, 4 * c + 4)
        assert all(g.has_edge(a, b) for a in inside for b in inside if a < b)
        assert g.has_edge(4 * c + 3, (4 * c + 4) % 16)
    assert nx.is_connected(g)


def test_lazy_rule_halves_the_spectral_gap(folder):
    from fedsim.registry import MIXING, TOPOLOGIES
    from fedsim.topologies.base import TopologyContext
    from fedsim.topologies.mixing import is_doubly_stochastic, spectral_gap

    g = TOPOLOGIES.get("ring_of_cliques").factory(TopologyContext(16, 0), cliques=4)
    w = MIXING.get("lazy_metropolis").factory(g).toarray()
    mh = reference_mh(g)
    np.testing.assert_allclose(w, (np.eye(16) + mh) / 2, atol=1e-15)
    assert is_doubly_stochastic(w) and np.allclose(w, w.T) and (np.diag(w) >= 0.5).all()
    eig = np.sort(np.linalg.eigvalsh(mh))  # eig[-1] = 1; λ₂ = eig[-2]
    assert eig[-2] > abs(eig[0])  # so MH's contraction factor is λ₂ itself ...
    assert spectral_gap(w) == pytest.approx((1 - eig[-2]) / 2, abs=1e-12)  # ... and the lazy one (1 + λ₂)/2
    assert spectral_gap(w) == pytest.approx(spectral_gap(mh) / 2, abs=1e-12)


def test_tutorial_config_runs_with_its_topology(folder):
    from fedsim.config import load_config
    from fedsim.runner import execute
    from fedsim.topologies.mixing import spectral_gap

    run = execute(load_config(folder / "cliques.yaml"), folder / "run", overwrite=True, progress=False)
    rows = run.rows
    assert run.protocol.topology.name == "ring_of_cliques"
    assert rows[-1]["test_accuracy"] > 0.5  # it learns (chance is 0.1)
    assert rows[-1]["node_acc_mean"] > rows[0]["node_acc_mean"]
    want = spectral_gap((np.eye(16) + reference_mh(nx.Graph(run.protocol.topology.graph()))) / 2)
    assert all(r["spectral_gap"] == pytest.approx(want, abs=1e-12) for r in rows[1:])


def test_bad_clique_count_is_a_one_line_config_error(folder):
    proc = subprocess.run(fedsim_cmd("run", str(folder / "cliques.yaml"), "topology.cliques=3", "--out",
                                     str(folder / "bad")), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedsim: error: topology.cliques: 3 cliques do not divide data.num_clients=16"
