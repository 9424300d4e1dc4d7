"""Model factories: logistic regression, MLP, a small CNN, the quadratic task's vector, and
the models papers name (`lenet5`, `resnet18`, `resnet20`, `femnist_cnn`, `char_lstm`,
`transformer_lm`; one module each in this package).

A factory gets a `ModelContext` (input shape, classes, dtype) and its own knobs and
returns a ``torch.nn.Module``. Any module is usable as ``model: {name: "pkg.mod:factory"}``
(called with the context's fields as keyword arguments it accepts, plus the knobs).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Annotated, Any, List

import torch
from torch import nn

from ..config import Each, Ge, OneOf
from ..registry import MODELS


@dataclass(frozen=True)
class ModelContext:
    """What a model factory learns from the data: input shape, number of classes, task, dtype."""

    input_shape: tuple[int, ...]
    num_classes: int | None
    task: str
    dtype: torch.dtype = torch.float32


CLASSIFIER_TASKS = ("classification", "multilabel", "regression")  # a head of num_classes outputs

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _require_classes(ctx: ModelContext, name: str) -> int:
    """Returns the number of outputs a classifier head needs: the classes (or labels, or
    regression targets); raises ValueError for tasks without them."""
    if ctx.task not in CLASSIFIER_TASKS or not ctx.num_classes:
        raise ValueError(f"model {name!r} needs a classification, multi-label or regression dataset "
                         f"(the data source is '{ctx.task}')")
    return ctx.num_classes


def image_shape(ctx: ModelContext, name: str) -> tuple[int, int, int]:
    """Returns the input's (C, H, W); raises ValueError unless the inputs are images."""
    if len(ctx.input_shape) != 3:
        raise ValueError(f"{name} needs image inputs [C, H, W], the data has shape {list(ctx.input_shape)}")
    c, h, w = ctx.input_shape
    return int(c), int(h), int(w)


@MODELS.register("logreg")
def logreg(ctx: ModelContext) -> nn.Module:
    """Multinomial logistic regression: flatten, one linear layer to the classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(ctx.input_shape), _require_classes(ctx, "logreg")))


@MODELS.register("mlp")
def mlp(
    ctx: ModelContext,
    hidden: Annotated[List[int], Each(Ge(1))] = (200,),
    activation: Annotated[str, OneOf(tuple(_ACTIVATIONS))] = "relu",
) -> nn.Module:
    """Multi-layer perceptron on the flattened input.

    Args:
        hidden: Width of each hidden layer.
        activation: Non-linearity between layers.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(ctx.input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, _require_classes(ctx, "mlp")))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(
    ctx: ModelContext,
    channels: Annotated[List[int], Each(Ge(1))] = (32, 64),
    hidden: Annotated[int, Ge(1)] = 128,
    kernel_size: Annotated[int, Ge(1)] = 3,
    groupnorm: bool = False,
) -> nn.Module:
    """Small CNN: [conv-ReLU-maxpool] per entry of `channels`, then a hidden FC layer.

    Args:
        channels: Output channels of each conv block (each block halves the spatial size).
        hidden: Width of the fully connected layer before the classifier.
        kernel_size: Convolution kernel size (padding keeps the spatial size).
        groupnorm: Add GroupNorm after each convolution.
    """
    c, h, w = image_shape(ctx, "cnn")
    layers: list[nn.Module] = []
    for out in channels:
        layers.append(nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2))
        if groupnorm:
            layers.append(nn.GroupNorm(min(8, out), out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, max(1, h // 2), max(1, w // 2)
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, _require_classes(ctx, "cnn"))]
    return nn.Sequential(*layers)


class Vector(nn.Module):
    """The model that is its own parameter vector x (for the quadratic task); forward returns x."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, init_std: float = 0.0):
        super().__init__()
        self.x = nn.Parameter(torch.randn(dim, dtype=dtype) * init_std)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.x.expand(inputs.shape[0], -1)


@MODELS.register("vector")
def vector(ctx: ModelContext, init_std: Annotated[float, Ge(0)] = 0.0) -> nn.Module:
    """The parameter vector x itself (quadratic task); starts at 0 or N(0, init_std²).

    Args:
        init_std: Standard deviation of the initial x (0 = start at the origin).
    """
    if ctx.task != "quadratic":
        raise ValueError("model 'vector' is for the quadratic task")
    return Vector(ctx.input_shape[0], ctx.dtype, init_std)


@MODELS.register("auto")
def auto(ctx: ModelContext) -> nn.Module:
    """'vector' for the quadratic task, an MLP with one hidden layer of 200 otherwise."""
    return vector(ctx) if ctx.task == "quadratic" else mlp(ctx)


def call_user_factory(factory: Any, ctx: ModelContext, kwargs: dict[str, Any]) -> nn.Module:
    """Calls a user's dotted-path factory with the context fields it accepts plus `kwargs`."""
    params = inspect.signature(factory).parameters
    accepts_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    offer = {"input_shape": ctx.input_shape, "num_classes": ctx.num_classes}
    given = {k: v for k, v in offer.items() if accepts_all or k in params}
    return factory(**given, **kwargs)


# the built-in models papers name, one module each; imported last (they use the helpers above)
from . import char_lstm, femnist_cnn, lenet5, resnet, transformer_lm  # noqa: E402,F401
