"""Keyed random draws: every draw depends on (seed, purpose, ids) only, never on a shared stream.

That makes results independent of the executor, the number of workers and the order in
which results come back. Two kinds of draws:

* `numpy_rng` / `torch_generator`: a fresh generator per key, for draws of arbitrary shape
  (a client's batch order, a model's initialisation).
* `uniform` / `normal`: counter-based hashes (SplitMix64), vectorised over an id array, for
  per-client draws in large populations (availability, dropout, speed profiles) in O(ids).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def key(seed: int, purpose: str, *ids: int) -> int:
    """Returns a 63-bit integer derived from (seed, purpose, ids)."""
    text = "\x1f".join([str(int(seed)), purpose, *(str(int(i)) for i in ids)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK63


def numpy_rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    """Returns a numpy Generator seeded by the key of (seed, purpose, ids)."""
    return np.random.default_rng(key(seed, purpose, *ids))


def torch_generator(seed: int, purpose: str, *ids: int) -> torch.Generator:
    """Returns a CPU torch.Generator seeded by the key of (seed, purpose, ids)."""
    gen = torch.Generator()
    gen.manual_seed(key(seed, purpose, *ids))
    return gen


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform(seed: int, purpose: str, ids: np.ndarray | int, *extra: int) -> np.ndarray:
    """Returns one U[0, 1) draw per id, keyed by (seed, purpose, extra, id)."""
    base = np.uint64(key(seed, purpose, *extra))
    ids64 = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(_splitmix64(ids64 * np.uint64(0xD1B54A32D192ED03)) ^ base)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(seed: int, purpose: str, ids: np.ndarray | int, *extra: int) -> np.ndarray:
    """Returns one N(0, 1) draw per id (Box-Muller on two keyed uniforms)."""
    u1 = uniform(seed, purpose + "/u1", ids, *extra)
    u2 = uniform(seed, purpose + "/u2", ids, *extra)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
