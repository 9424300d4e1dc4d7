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
    return aggregation_weight_array(rule, clients, num_samples, p, freq).tolist()


def aggregation_weight_array(
    rule: str,
    clients: Sequence[int] | np.ndarray,
    num_samples: Sequence[int] | np.ndarray,
    p: np.ndarray | None = None,
    freq: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """`aggregation_weights` as a float64 array (the same values, computed without a Python loop)."""
    k = len(clients)
    if rule not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {rule!r} (known: {', '.join(WEIGHTINGS)})")
    if not k:
        return np.zeros(0, dtype=np.float64)
    if rule == "samples":
        n = np.asarray(num_samples, dtype=np.int64)
        total = float(n.sum())
        return n / total if total else np.full(k, 1.0 / k)
    if rule == "identical":
        return np.full(k, 1.0 / k)
    if p is None or freq is None:
        raise ValueError("the unbiased weighting needs importances p and frequencies f")
    return np.asarray(p, dtype=np.float64)[np.asarray(clients, dtype=np.int64)] / np.asarray(freq, dtype=np.float64)
