"""LEAF's FEMNIST CNN (Caldas et al., 2018, "LEAF: A Benchmark for Federated Settings").

conv 5×5 → 32 ('same'), ReLU, max-pool 2; conv 5×5 → 64 ('same'), ReLU, max-pool 2;
FC 2048, ReLU; classifier (62 classes on FEMNIST). As LEAF's reference model
(models/femnist/cnn.py), on 28×28 single-channel inputs; other image sizes work too.
"""
from __future__ import annotations

from torch import nn

from ..registry import MODELS
from . import ModelContext, _require_classes, image_shape


@MODELS.register("femnist_cnn")
def femnist_cnn(ctx: ModelContext) -> nn.Module:
    """LEAF's FEMNIST CNN: two 5×5 conv blocks (32, 64 channels) and FC 2048 (Caldas et al., 2018)."""
    c, h, w = image_shape(ctx, "femnist_cnn")
    h2, w2 = h // 4, w // 4
    if h2 < 1 or w2 < 1:
        raise ValueError(f"femnist_cnn needs images of at least 4×4, the data has {h}×{w}")
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * h2 * w2, 2048), nn.ReLU(),
        nn.Linear(2048, _require_classes(ctx, "femnist_cnn")),
    )
