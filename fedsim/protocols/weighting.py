"""Aggregation weights w_i that protocols put in each Msg (Fraboni et al.'s d_i, normalised).

* ``samples``: w_i = n_i / Σ_{j∈S} n_j — classic FedAvg over the aggregated set S.
* ``identical``: w_i = 1/|S| — the plain mean (Fraboni's "identical"; FedBuff-c: 1/c).
* ``unbiased``: w_i = p_i / f_i — Fraboni's "weight" variants: p_i is the client's importance
  in the federated objective and f_i its expected share of aggregations, so that the
  expected weight per aggregation is p_i and the scheme optimises Σ p_i L_i. The protocol
  knows f_i in advance (the oracle: the sampling probability of a synchronous round, or a
  learning-free trace of the asynchronous schedule), which only a simulation can do.
* ``unbiased_online``: the same w_i = p_i / f_i with f_i estimated from what has been
  observed so far (`online_frequencies`): client i's updates in the aggregations up to this
  one, divided by their number. It needs no knowledge of the schedule, so a deployment can
  use it, and a simulation gives the same weights for the same arrivals.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

WEIGHTINGS = ("samples", "identical", "unbiased", "unbiased_online")
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
        raise ValueError(f"the {rule} weighting needs importances p and frequencies f")
    return np.asarray(p, dtype=np.float64)[np.asarray(clients, dtype=np.int64)] / np.asarray(freq, dtype=np.float64)


def online_frequencies(counts: np.ndarray, done: int, clients: np.ndarray) -> np.ndarray:
    """Returns the estimated f_i of each of `clients` (one entry per update, a client may
    appear more than once) for the aggregation after `done` earlier ones: (c_i + k_i) / (done + 1),
    c_i = client i's updates in those (``counts[i]``), k_i = its updates in this one."""
    clients = np.asarray(clients, dtype=np.int64)
    here = np.unique(clients, return_inverse=True)[1]
    k = np.bincount(here)[here]
    return (np.asarray(counts, dtype=np.float64)[clients] + k) / (done + 1)


def count_updates(counts: np.ndarray, clients: np.ndarray) -> None:
    """Adds one update of each of `clients` to `counts` (in place; repeated clients count each time)."""
    np.add.at(counts, np.asarray(clients, dtype=np.int64), 1)
