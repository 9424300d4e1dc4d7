"""Benchmark plugin: offline CIFAR-10-shaped data and pfl-research's small CIFAR CNN.

* data source ``cifar_shaped``: 3×32×32 float images, 10 classes, 50,000 train + 10,000
  test (CIFAR-10's shape, not its content): x = μ_y + N(0, σ²), with per-class means drawn
  once from the seed, so the task is learnable and accuracy is meaningful.
* model ``benchmarks._images:pfl_cnn``: pfl-research's ``simple_cnn`` (benchmarks/model/
  pytorch/cnn.py: conv3×3 32 – ReLU – conv3×3 64 – ReLU – maxpool 2 – dropout 0.25 – dense
  128 – ReLU – dropout 0.5 – dense 10, Glorot-uniform weights), inputs channels-first.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from fedsim.config import Ge, Gt
from fedsim.data.base import SourceContext, SourceData
from fedsim.registry import DATA_SOURCES
from fedsim.rng import torch_generator


@DATA_SOURCES.register("cifar_shaped")
def cifar_shaped(
    ctx: SourceContext,
    num_train: Annotated[int, Ge(1)] = 50_000,
    num_test: Annotated[int, Ge(1)] = 10_000,
    noise: Annotated[float, Gt(0)] = 3.0,
) -> SourceData:
    """CIFAR-10-shaped Gaussian class images (3×32×32, 10 classes), generated from the seed.

    Args:
        num_train: Training images.
        num_test: Test images.
        noise: Standard deviation of the per-pixel noise around each class mean.
    """
    return class_images(ctx.seed, "cifar_shaped", (3, 32, 32), 10, num_train, num_test, noise)


def class_images(seed: int, purpose: str, shape: tuple[int, ...], classes: int, num_train: int, num_test: int,
                 noise: float) -> SourceData:
    """Gaussian images around one random mean per class, drawn from a generator keyed by
    (seed, purpose); the first `num_train` are the training set."""
    gen = torch_generator(seed, purpose)
    means = torch.randn((classes, *shape), generator=gen)
    n = num_train + num_test
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn((n, *shape), generator=gen).mul_(noise).add_(means[y])
    return SourceData(x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=classes)


def pfl_cnn(input_shape, num_classes: int, dropout: bool = True) -> nn.Module:
    """pfl-research's simple_cnn for [C, H, W] inputs (dropout=False removes both dropouts)."""
    c, h, _ = input_shape
    flat = ((h - 4) // 2) ** 2 * 64
    drop = (lambda p: nn.Dropout(p)) if dropout else (lambda p: nn.Identity())
    model = nn.Sequential(
        nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), drop(0.25),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), drop(0.5), nn.Linear(128, num_classes),
    )
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return model


@DATA_SOURCES.register("femnist_shaped")
def femnist_shaped(
    ctx: SourceContext,
    num_train: Annotated[int, Ge(1)] = 768_400,
    num_test: Annotated[int, Ge(1)] = 10_000,
    noise: Annotated[float, Gt(0)] = 3.0,
) -> SourceData:
    """FEMNIST-shaped Gaussian class images (1×28×28, 62 classes; by default 3,400 writers'
    worth, 226 each on average), generated from the seed; arguments as `cifar_shaped`'s."""
    return class_images(ctx.seed, "femnist_shaped", (1, 28, 28), 62, num_train, num_test, noise)
