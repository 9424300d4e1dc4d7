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

import torch
from torch.func import vmap

from ..task import Task

IMAGE_DIMS = 6  # a cohort's gathered images: [clients, steps, batch, channels, height, width]


def clients_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Returns the cohort's images `x` ``[M, K, B, C, H, W]`` with the same shape and values,
    stored as ``[K, B, H, W, M, C]`` (one copy); any other tensor is returned unchanged."""
    if x.dim() != IMAGE_DIMS:
        return x
    return x.permute(1, 2, 4, 5, 0, 3).contiguous().permute(4, 0, 1, 5, 2, 3)


def accepts_channels_last(task: Task, device: torch.device) -> str | None:
    """Runs `task`'s model (whose parameters live on `device`) forward under vmap for two
    clients of two images laid out by `clients_channels_last`, in eval mode (no random draws,
    no running statistics updated; the layers' modes are put back). Returns None when it
    runs, else why not: a model that calls ``.view`` on its input, for one, cannot take
    these strides."""
    shape = task.info.get("input_shape")
    if shape is None or len(shape) != IMAGE_DIMS - 3:
        return None  # not images: the layout does not apply
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 2, *shape), generator=gen, dtype=task.info.get("input_dtype", torch.float32)).to(device)
    params = task.initial_params().to(device)
    layers = list(task.module.modules())
    modes = [layer.training for layer in layers]
    task.module.eval()
    try:
        with torch.no_grad():
            vmap(lambda p, xs: task.forward(p, xs[0]))(torch.stack([params, params]), clients_channels_last(x))
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the default layout
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
    return None
