"""Mixing matrices over a graph, their spectral gap, and their form for the node stack.

A rule maps a graph to a sparse ``[n, n]`` matrix W whose row i holds the weights node i
gives to its own model (``w_ii``) and to the models it receives (``w_ij``, j an
in-neighbour). On an undirected graph every rule here is symmetric and doubly stochastic,
so gossip ``X ← W X`` keeps the nodes' average exactly and contracts the disagreement
``‖X − 1x̄ᵀ‖`` by at least ``λ = ‖W − 11ᵀ/n‖₂`` per step (1 − λ is the spectral gap; for a
symmetric W, λ = max(|λ₂|, |λ_n|)).
"""
from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from fedsim.registry import MIXING

DENSE_UP_TO = 256  # node counts up to this use a dense W on the stack; larger ones CSR


def receive_adjacency(graph: nx.Graph) -> sp.csr_array:
    """Returns R with R[i, j] = 1 when node i receives from node j (no self-loops)."""
    n = graph.number_of_nodes()
    a = nx.to_scipy_sparse_array(graph, nodelist=range(n), weight=None, format="csr")
    r = (a.T if graph.is_directed() else a).tocsr()
    r.setdiag(0)
    r.eliminate_zeros()
    r.data[:] = 1.0
    return r


def _with_diagonal(off: sp.csr_array) -> sp.csr_array:
    """Returns off + diag(1 − row sums of off): every row sums to one."""
    n = off.shape[0]
    return (off + sp.diags_array(1.0 - np.asarray(off.sum(axis=1)).ravel(), shape=(n, n))).tocsr()


def _edge_weights(r: sp.csr_array, weight) -> sp.csr_array:
    coo = r.tocoo()
    return sp.csr_array((weight(coo.row, coo.col), (coo.row, coo.col)), shape=r.shape)


@MIXING.register("metropolis_hastings")
def metropolis_hastings(graph: nx.Graph) -> sp.csr_array:
    """w_ij = 1 / (1 + max(deg_i, deg_j)) on edges, w_ii = 1 − Σ_j w_ij (symmetric, doubly stochastic)."""
    r = receive_adjacency(graph)
    deg = np.asarray(r.sum(axis=1)).ravel()
    return _with_diagonal(_edge_weights(r, lambda i, j: 1.0 / (1.0 + np.maximum(deg[i], deg[j]))))


@MIXING.register("uniform")
def uniform(graph: nx.Graph) -> sp.csr_array:
    """w_ij = w_ii = 1 / (deg + 1) — for regular graphs only (else W is not doubly stochastic)."""
    r = receive_adjacency(graph)
    deg = np.asarray(r.sum(axis=1)).ravel()
    if len(deg) and deg.min() != deg.max():
        raise ValueError(f"'uniform' weights need a regular graph (degrees here range {deg.min():g}..{deg.max():g}); "
                         "use metropolis_hastings or max_degree")
    return _with_diagonal(_edge_weights(r, lambda i, j: 1.0 / (1.0 + deg[i])))


@MIXING.register("max_degree")
def max_degree(graph: nx.Graph) -> sp.csr_array:
    """w_ij = 1 / (1 + Δ) on edges (Δ the largest degree), w_ii = 1 − deg_i / (1 + Δ).

    The +1 keeps w_ii > 0, so bipartite graphs (an even ring) still converge.
    """
    r = receive_adjacency(graph)
    top = float(np.asarray(r.sum(axis=1)).max()) if r.shape[0] else 0.0
    return _with_diagonal(_edge_weights(r, lambda i, j: np.full(len(i), 1.0 / (1.0 + top))))


def restrict(w: sp.csr_array, active: np.ndarray) -> sp.csr_array:
    """Returns W for a round where only `active` nodes take part: links to inactive nodes are
    dropped and their weight moved to the diagonal (symmetric and doubly stochastic stay so)."""
    n = w.shape[0]
    keep = sp.diags_array(np.asarray(active, dtype=np.float64), shape=(n, n))
    off = w - sp.diags_array(w.diagonal(), shape=(n, n))
    return _with_diagonal((keep @ off @ keep).tocsr())


def message_counts(w: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """Returns (models each node receives, models each node sends) in one gossip step with W."""
    off = (w - sp.diags_array(w.diagonal(), shape=w.shape)).tocsr()
    nonzero = (off != 0).astype(np.int64)
    return np.asarray(nonzero.sum(axis=1)).ravel(), np.asarray(nonzero.sum(axis=0)).ravel()


def contraction(w: sp.csr_array | np.ndarray) -> float:
    """Returns λ = ‖W − 11ᵀ/n‖₂, the factor by which one gossip step at least shrinks the disagreement."""
    dense = w.toarray() if sp.issparse(w) else np.asarray(w, dtype=np.float64)
    n = dense.shape[0]
    if n <= 1:
        return 0.0
    return min(1.0, float(np.linalg.norm(dense - np.full((n, n), 1.0 / n), 2)))  # ≤ 1 up to rounding


def spectral_gap(w: sp.csr_array | np.ndarray) -> float:
    """Returns 1 − λ (see `contraction`): 1 for exact averaging, 0 for no mixing."""
    return 1.0 - contraction(w)


def is_doubly_stochastic(w: sp.csr_array | np.ndarray, tol: float = 1e-12) -> bool:
    """True when W ≥ 0 and its rows and columns each sum to one (within `tol`)."""
    dense = w.toarray() if sp.issparse(w) else np.asarray(w)
    return bool((dense >= -tol).all() and np.allclose(dense.sum(0), 1, atol=tol) and np.allclose(dense.sum(1), 1, atol=tol))


def as_tensor(w: sp.csr_array, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Returns W as a torch matrix for ``W @ X``: dense for small n, sparse CSR beyond `DENSE_UP_TO`."""
    if w.shape[0] <= DENSE_UP_TO:
        return torch.as_tensor(w.toarray(), dtype=dtype, device=device)
    w = w.tocsr()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.as_tensor(w.indptr, dtype=torch.int64),
            torch.as_tensor(w.indices, dtype=torch.int64),
            torch.as_tensor(w.data, dtype=dtype),
            size=w.shape,
            device=device,
            check_invariants=True,
        )
