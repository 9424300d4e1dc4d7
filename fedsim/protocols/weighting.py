"""Aggregation weights w_i that protocols put in each Msg (Fraboni et al.'s d_i, normalised).

* ``samples``: w_i = n_i / Σ_{j∈S} n_j — classic FedAvg over the aggregated set S.
* ``identical``: w_i = 1/|S| — the plain mean (Fraboni's "identical"; FedBuff-c: 1/c).
* ``unbiased``: w_i = p_i / f_i — Fraboni's "weight" variants: p_i is the client's importance
  in the federated objective and f_i its expected share of aggregations, so that the
  expected weight per aggregation is p_i and the scheme optimises Σ p_i L_i.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

WEIGHTINGS = ("samples", "identical", "unbiased")
IMPORTANCES = ("samples", "uniform")


def importance(samples_per_client: np.ndarray, kind: str) -> np.ndarray:
    """Returns p_i (summing to 1): proportional to samples, or uniform."""
    n = np.asarray(samples_per_client, dtype=np.float64)
    if kind == "uniform" or n.sum() == 0:
        return np.full(len(n), 1.0 / len(n))
    return n / n.sum()


def aggregation_weights(
    rule: str,
    clients: Sequence[int],
    num_samples: Sequence[int],
    p: np.ndarray | None = None,
    freq: Sequence[float] | None = None,
) -> list[float]:
    """Returns w_i for the clients of one aggregation under `rule` (see the module docstring)."""
    if not clients:
        return []
    if rule == "samples":
        total = float(sum(num_samples))
        return [n / total if total else 1.0 / len(clients) for n in num_samples]
    if rule == "identical":
        return [1.0 / len(clients)] * len(clients)
    if rule == "unbiased":
        if p is None or freq is None:
            raise ValueError("the unbiased weighting needs importances p and frequencies f")
        return [float(p[c]) / float(f) for c, f in zip(clients, freq)]
    raise ValueError(f"unknown weighting {rule!r} (known: {', '.join(WEIGHTINGS)})")
