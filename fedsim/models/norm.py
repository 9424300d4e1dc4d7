"""The normalisation layer a model asks for by name: GroupNorm, BatchNorm, LayerNorm or none."""
from __future__ import annotations

from typing import Annotated

from torch import nn

from ..config import OneOf

NORMS = ("group", "batch", "layer", "none")
Norm = Annotated[str, OneOf(NORMS)]


def norm2d(kind: str, channels: int, groups: int = 2) -> nn.Module:
    """Returns the normalisation of `channels` feature maps: 'group' (GroupNorm with `groups`
    groups, or fewer when they do not divide the channels), 'batch' (BatchNorm2d with running
    statistics), 'layer' (GroupNorm with one group: LayerNorm over C, H, W) or 'none'."""
    if kind == "group":
        g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
        return nn.GroupNorm(g, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (known: {', '.join(NORMS)})")
