"""Which samples a job trains on: a [K, B] index matrix per job, −1 marking padding."""
from __future__ import annotations

import numpy as np
import torch

from ..strategy import Batches


def job_indices(
    client_indices: np.ndarray,
    batch_size: int,
    epochs: int,
    steps: int | None,
    sampling: str,
    drop_last: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Returns the [K, B] sample indices of one job (−1 = padding in a short last batch).

    'epoch': `epochs` shuffled passes cut into consecutive batches (with `steps`: passes are
    concatenated until K full batches exist). 'replacement': every step draws B distinct
    samples afresh (fewer if the client has fewer), independent of the other steps.
    """
    n = len(client_indices)
    if n == 0:
        return np.zeros((0, batch_size), dtype=np.int64)
    b = batch_size
    if sampling == "replacement":
        k = steps if steps is not None else epochs * max(1, -(-n // b))
        out = np.full((k, b), -1, dtype=np.int64)
        take = min(b, n)
        for s in range(k):
            out[s, :take] = client_indices[rng.choice(n, size=take, replace=False)]
        return out
    if steps is not None:
        need = steps * b
        order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
        return client_indices[order].reshape(steps, b)
    rows = []
    for _ in range(epochs):
        perm = client_indices[rng.permutation(n)]
        full = n // b
        if full:
            rows.append(perm[: full * b].reshape(full, b))
        rest = n - full * b
        if rest and not (drop_last and full):
            last = np.full((1, b), -1, dtype=np.int64)
            last[0, :rest] = perm[full * b :]
            rows.append(last)
    return np.concatenate(rows) if rows else np.zeros((0, b), dtype=np.int64)


def gather_batches(x: torch.Tensor, y: torch.Tensor, indices: np.ndarray) -> Batches:
    """Materialises the stacked batches of a job from shared tensors and its index matrix."""
    idx = torch.as_tensor(indices, dtype=torch.int64, device=x.device)  # data on a GPU: indices there too
    mask = (idx >= 0).to(x.dtype if x.is_floating_point() else torch.float32)
    safe = idx.clamp_min(0)
    return Batches(x[safe], y[safe], mask)
