"""Small pure functions over flat parameter vectors (1-D tensors) used by strategies."""
from __future__ import annotations

from typing import Sequence

import torch


def weighted_sum(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Returns Σ_i w_i v_i, accumulated in the given order (in a buffer this function owns)."""
    if not vectors:
        raise ValueError("weighted_sum of no vectors")
    out = torch.zeros_like(vectors[0])
    for v, w in zip(vectors, weights):
        out.add_(v, alpha=float(w))
    return out


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns ⟨a, b⟩ over all entries (a 0-d tensor)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def norm(a: torch.Tensor) -> torch.Tensor:
    """Returns the global Euclidean norm ‖a‖₂ over all entries."""
    return torch.linalg.vector_norm(a)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Returns ⟨a, b⟩ / (‖a‖‖b‖), 0 when either is the zero vector."""
    return dot(a, b) / (norm(a) * norm(b)).clamp_min(eps)
