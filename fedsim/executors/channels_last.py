"""Clients' images laid out so that vmap's grouped convolutions run channels-last (NHWC).

Under ``vmap`` a convolution whose weights differ per client becomes one grouped
convolution: the batching rule moves the client dimension next to the channels and merges
the two, ``[M, B, C, H, W] -> [B, M·C, H, W]``, with ``groups = M``. When a cohort's images
are stored as ``[B, H, W, M, C]`` in memory (the logical shape unchanged), that merge is a
view whose strides are channels-last, so the convolution library gets NHWC input without a
copy; its output is channels-last too, and the merge before the next convolution is again a
view. The values are the same images: results equal the default layout's up to the float
rounding of a different convolution algorithm.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.func import vmap

from ..errors import first_line
from ..rng import cuda_index, keyed_torch
from ..strategy import Batches, GradFn, Tensor
from ..task import Task

IMAGE_DIMS = 6  # a cohort's gathered images: [clients, steps, batch, channels, height, width]


def clients_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Returns the cohort's images `x` ``[M, K, B, C, H, W]`` with the same shape and values,
    stored as ``[K, B, H, W, M, C]`` (one copy); any other tensor is returned unchanged."""
    if x.dim() != IMAGE_DIMS:
        return x
    return x.permute(1, 2, 4, 5, 0, 3).contiguous().permute(4, 0, 1, 5, 2, 3)


def accepts_channels_last(task: Task, grad_fn: GradFn, x: Tensor, y: Tensor, mask_dtype: torch.dtype,
                          randomness: str) -> str | None:
    """Runs one vectorised gradient step, as a cohort runs it, for two clients on the first
    two samples of the training set (`x`, `y`, on the executor's device), with the images
    laid out by `clients_channels_last`; torch's generators are put back after it. Returns
    None when it runs (or when the images are not [C, H, W]), else why not: GroupNorm, or a
    model that calls ``.view`` on its images, cannot take these strides under vmap. A step
    that fails in the native layout too is not the layout's doing: None (the cohort reports it)."""
    if x.dim() != IMAGE_DIMS - 2:
        return None  # not images [N, C, H, W]: the layout does not apply
    n = min(2, len(x))
    xs = x[:n].expand(2, 1, *x[:n].shape)  # [clients, K = 1, B, C, H, W]
    ys = y[:n].expand(2, 1, *y[:n].shape)
    mask = torch.ones(2, 1, n, dtype=mask_dtype, device=x.device)
    params = task.initial_params().to(x.device)
    params = torch.stack([params, params])

    def step(p: Tensor, xb: Tensor, yb: Tensor, m: Tensor) -> Any:
        return grad_fn(p, Batches(xb, yb, m)[0])

    def fails(images: Tensor) -> str | None:
        try:
            with keyed_torch(0, cuda_index(x.device)):
                vmap(step, randomness=randomness)(params, images, ys, mask)
        except Exception as exc:  # noqa: BLE001 - any failure: see below
            return f"{type(exc).__name__}: {first_line(exc, 200)}"
        return None

    why = fails(clients_channels_last(xs))
    return None if why is None or fails(xs.contiguous()) is not None else why
