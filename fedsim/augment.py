"""Training-time augmentation and input normalisation, as pure tensor functions.

* Random crop with zero padding and horizontal flip (the standard CIFAR training pipeline:
  pad 4, crop back to the image size, flip with probability ½) are applied to a job's
  mini-batches on the device that trains, before the strategy's local update sees them. The
  draws are keyed by (seed, client, job): step k of a job uses row k of the job's draws, so
  the serial, vmap and Ray executors (and a resumed run) train on the same augmented images.
  The vmap executor augments a whole cohort's batches in one call.
* Normalisation ``(x − mean_c) / std_c`` per channel is part of the task's forward pass, so
  it applies to training (after crop and flip, as torchvision's ToTensor + Normalize after
  RandomCrop does: padding is black in the raw image) and to every evaluation alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .errors import ConfigError
from .rng import numpy_rng

Tensor = torch.Tensor


@dataclass(frozen=True)
class Augment:
    """Which training augmentations run: crop padding in pixels (0: no crop) and flips."""

    crop_padding: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip


def from_config(data_common: dict, input_shape: tuple[int, ...]) -> Augment:
    """Returns the Augment of the data section's `augment_crop`/`augment_flip`; raises
    ConfigError unless the inputs are images [C, H, W] when either is on."""
    aug = Augment(int(data_common.get("augment_crop", 0) or 0), bool(data_common.get("augment_flip", False)))
    if aug.active and len(input_shape) != 3:
        key = "data.augment_crop" if aug.crop_padding else "data.augment_flip"
        raise ConfigError(key, f"crops and flips need image inputs [C, H, W]; the data has inputs of shape {list(input_shape)}")
    return aug


def job_draws(aug: Augment, seed: int, client: int, job_id: int, steps: int, batch: int) -> np.ndarray:
    """Returns the job's draws [steps, batch, 3] (int64): crop offsets (dy, dx) in
    [0, 2·padding] and a 0/1 flip, keyed by (seed, client, job)."""
    rng = numpy_rng(seed, "augment", client, job_id)
    out = np.zeros((steps, batch, 3), dtype=np.int64)
    if aug.crop_padding > 0:
        out[..., :2] = rng.integers(0, 2 * aug.crop_padding + 1, size=(steps, batch, 2))
    if aug.flip:
        out[..., 2] = rng.integers(0, 2, size=(steps, batch))
    return out


def apply(x: Tensor, draws: Tensor, padding: int) -> Tensor:
    """Crops and flips images x [..., C, H, W] by `draws` [..., 3] (same leading shape): the
    image padded by `padding` zeros on each side, cut at offset (dy, dx), mirrored where the
    flip is 1. Pure; the same maths for one job's batches and a stacked cohort's."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    d = draws.reshape(-1, 3).to(x.device)
    padded = F.pad(flat, (padding, padding, padding, padding)) if padding > 0 else flat
    n, wp = flat.shape[0], w + 2 * padding
    rows = d[:, :1] + torch.arange(h, device=x.device)  # [n, H]
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(d[:, 2:3] > 0, w - 1 - cols, cols) + d[:, 1:2]  # [n, W]
    picked = padded.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    out = picked.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return out.reshape(*lead, c, h, w)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x − mean_c) / std_c over the channel axis of images [..., C, H, W]."""
    return (x - mean.to(x).reshape(-1, 1, 1)) / std.to(x).reshape(-1, 1, 1)
