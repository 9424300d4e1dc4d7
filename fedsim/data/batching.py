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
    if epochs <= 0:
        return np.zeros((0, b), dtype=np.int64)
    full, rest = divmod(n, b)
    tail = 1 if rest and not (drop_last and full) else 0  # a short last batch, padded with −1
    if epochs == 1 and not tail:  # the common case: one shuffled pass in full batches
        return client_indices[rng.permutation(n)][: full * b].reshape(full, b)
    per = full + tail
    used = min(n, per * b)  # samples a pass places: all of them, or the full batches' with drop_last
    dtype = client_indices.dtype
    if tail and dtype != np.int64:  # the padded row is int64, as the padding value −1 needs
        dtype = np.result_type(dtype, np.int64)
    out = np.empty((epochs, per * b), dtype=dtype)
    out.fill(-1)
    for e in range(epochs):
        out[e, :used] = client_indices[rng.permutation(n)[:used]]
    return out.reshape(epochs * per, b)


def gather_batches(x: torch.Tensor, y: torch.Tensor, indices: np.ndarray) -> Batches:
    """Materialises the stacked batches of a job from shared tensors and its index matrix."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64, device=x.device)  # data on a GPU: indices there too
    mask = (idx >= 0).to(x.dtype if x.is_floating_point() else torch.float32)
    safe = idx.clamp_min(0)
    return Batches(x[safe], y[safe], mask)
