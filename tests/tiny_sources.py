"""Tiny in-memory data sources of every task kind, for tests (named by dotted path in configs)."""
from __future__ import annotations

import torch

from fedsim.data.base import SourceContext, SourceData


def _split(x: torch.Tensor, y: torch.Tensor, test: int) -> tuple:
    return x[test:], y[test:], x[:test], y[:test]


def images(ctx: SourceContext, channels: int = 3, size: int = 32, classes: int = 4, samples: int = 96) -> SourceData:
    """Class-dependent noisy images [channels, size, size]; a sixth is the test set."""
    gen = torch.Generator().manual_seed(ctx.seed)
    y = torch.randint(0, classes, (samples,), generator=gen)
    centres = torch.randn(classes, channels, 1, 1, generator=gen)
    x = centres[y] + 0.5 * torch.randn(samples, channels, size, size, generator=gen)
    return SourceData(*_split(x, y, samples // 6), num_classes=classes)


def multilabel(ctx: SourceContext, labels: int = 5, features: int = 12, samples: int = 120) -> SourceData:
    """Features [features] whose linear scores decide each of `labels` 0/1 labels."""
    gen = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(samples, features, generator=gen)
    y = (x @ torch.randn(features, labels, generator=gen) > 0).float()
    return SourceData(*_split(x, y, samples // 6), num_classes=labels, task="multilabel")


def regression(ctx: SourceContext, targets: int = 1, features: int = 6, samples: int = 120) -> SourceData:
    """y = x·w + noise with `targets` outputs ([n] when 1)."""
    gen = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(samples, features, generator=gen)
    y = x @ torch.randn(features, targets, generator=gen) + 0.1 * torch.randn(samples, targets, generator=gen)
    return SourceData(*_split(x, y.squeeze(-1) if targets == 1 else y, samples // 6), num_classes=targets,
                      task="regression")


def tokens(ctx: SourceContext, vocab: int = 11, length: int = 8, samples: int = 96) -> SourceData:
    """Sequences counting up modulo `vocab` from a random start; targets are the next token,
    with the last 1-3 positions padding (−1)."""
    gen = torch.Generator().manual_seed(ctx.seed)
    start = torch.randint(0, vocab, (samples, 1), generator=gen)
    seq = (start + torch.arange(length + 1)) % vocab
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    pad = torch.randint(1, 4, (samples,), generator=gen)
    y[torch.arange(length) >= (length - pad).unsqueeze(1)] = -1
    return SourceData(*_split(x, y, samples // 6), num_classes=vocab, task="lm")


def chars(ctx: SourceContext, vocab: int = 9, length: int = 10, samples: int = 96) -> SourceData:
    """Character sequences; the class is the next character (Shakespeare-shaped)."""
    gen = torch.Generator().manual_seed(ctx.seed)
    start = torch.randint(0, vocab, (samples, 1), generator=gen)
    seq = (start + torch.arange(length + 1)) % vocab
    return SourceData(*_split(seq[:, :-1].clone(), seq[:, -1].clone(), samples // 6), num_classes=vocab)


def l1_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user loss: per-sample absolute error of [n, 1] outputs against [n] targets."""
    return (out.squeeze(-1) - y).abs()


def seeded_width(ctx: SourceContext, samples: int = 60) -> SourceData:
    """Regression whose inputs have 3 + seed features: runs of different seeds differ in shape."""
    return regression(ctx, features=3 + ctx.seed, samples=samples)
