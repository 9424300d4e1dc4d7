"""LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document recognition").

conv 5×5 → 6, pool, conv 5×5 → 16, pool, FC 120, FC 84, classifier. Deviations from the 1998
network, as in the FL papers that use it: ReLU (configurable) instead of scaled tanh, max
pooling instead of trainable sub-sampling, full connections between the conv layers.
28×28 inputs (MNIST) get 2 pixels of zero padding in the first convolution, so the network
sees 32×32 as in the paper.
"""
from __future__ import annotations

from typing import Annotated

from torch import nn

from ..config import OneOf
from ..registry import MODELS
from . import _ACTIVATIONS, ModelContext, _require_classes, image_shape


@MODELS.register("lenet5")
def lenet5(ctx: ModelContext, activation: Annotated[str, OneOf(tuple(_ACTIVATIONS))] = "relu") -> nn.Module:
    """LeNet-5 for 28×28 or 32×32 images (LeCun et al., 1998), ~62k parameters on MNIST.

    Args:
        activation: Non-linearity after each conv and hidden FC layer.
    """
    c, h, w = image_shape(ctx, "lenet5")
    pad = 2 if (h, w) == (28, 28) else 0
    h1, w1 = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
    h2, w2 = (h1 - 4) // 2, (w1 - 4) // 2
    if h2 < 1 or w2 < 1:
        raise ValueError(f"lenet5 needs images of at least 16×16, the data has {h}×{w}")
    act = _ACTIVATIONS[activation]
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad), act(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * h2 * w2, 120), act(), nn.Linear(120, 84), act(),
        nn.Linear(84, _require_classes(ctx, "lenet5")),
    )
