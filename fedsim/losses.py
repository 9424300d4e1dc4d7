"""Losses and evaluation metrics of each task kind, as pure tensor functions.

A data source says which kind of task it is (`SourceData.task`); the kind fixes the loss the
clients minimise and the metrics every evaluation reports:

============== ============================== ==================== ===============================
kind           targets y                      model outputs        loss; metrics
============== ============================== ==================== ===============================
classification class ids [n] (int64)          scores [n, C]        cross-entropy; top-1, top-5 acc.
multilabel     0/1 per label [n, C] (float)   scores [n, C]        binary cross-entropy (mean over
                                                                   labels); micro and macro F1
regression     values [n] or [n, k] (float)   [n, k]               squared error (mean over
                                                                   targets); MSE, MAE
lm             next token ids [n, T] (int64); scores [n, T, V]     per-token cross-entropy over
               negative ids are padding                            real tokens; perplexity,
                                                                   token accuracy
quadratic      curvature a_i [n] (float)      the point x [n, d]   ½·a_i·‖x − b‖²; distance to x*
============== ============================== ==================== ===============================

`model.loss` replaces the training and test loss by a registered per-sample loss
(`cross_entropy`, `binary_cross_entropy`, `squared_error`, `absolute_error`) or a user's
``"package.module:fn"`` with ``fn(outputs, targets) -> per-sample losses [n]`` (pure tensor
code, so it runs under vmap); the kind's other metrics are still reported. Sums are accumulated over evaluation batches,
so every metric is exact over the whole test set.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .registry import LOSSES

Tensor = torch.Tensor
KINDS = ("classification", "multilabel", "regression", "lm", "quadratic")
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the rows where `mask` is 1 (0 when none is)."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


@LOSSES.register("cross_entropy")
def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy of class scores [n, C] against class ids [n].

    Written as −log_softmax(out)[y]: bitwise equal to ``F.cross_entropy`` (values and
    gradients), but under vmap it does not run the decomposition whose shape check imports
    sympy (0.35 s of a short run's start-up)."""
    return -torch.log_softmax(out, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


@LOSSES.register("binary_cross_entropy")
def binary_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample binary cross-entropy with logits, averaged over the labels: [n, C] → [n]."""
    return torch.nn.functional.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none").mean(-1)


def _as_targets(out: Tensor, y: Tensor) -> Tensor:
    """Regression targets shaped like the outputs ([n] targets for [n, 1] outputs)."""
    return y.to(out.dtype).reshape(out.shape)


@LOSSES.register("squared_error")
def squared_error(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample squared error, averaged over the targets: [n, k] → [n]."""
    return ((out - _as_targets(out, y)) ** 2).reshape(out.shape[0], -1).mean(-1)


@LOSSES.register("absolute_error")
def absolute_error(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample absolute error, averaged over the targets: [n, k] → [n] (an L1 regression loss)."""
    return (out - _as_targets(out, y)).abs().reshape(out.shape[0], -1).mean(-1)


def quadratic(out: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Per-sample ½·a·‖out − b‖² of the federated quadratic task (y = a, x = b)."""
    return 0.5 * y * ((out - x) ** 2).sum(-1)


def token_cross_entropy(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (cross-entropy of each token [n, T], 0/1 real-token mask [n, T]) for scores
    [n, T, V] against next-token ids [n, T] whose negative entries are padding."""
    real = y >= 0
    ce = -torch.log_softmax(out, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return ce, real.to(out.dtype)


def batch_loss(kind: str, out: Tensor, y: Tensor, x: Tensor, mask: Tensor, custom: PerSampleLoss | None) -> Tensor:
    """The training loss of one mini-batch: the masked mean of per-sample losses (padding
    rows have mask 0); for 'lm', the mean over the real tokens of the unmasked rows."""
    if custom is not None:
        return masked_mean(custom(out, y), mask)
    if kind == "lm":
        ce, real = token_cross_entropy(out, y)
        weight = real * mask.unsqueeze(-1)
        return (ce * weight).sum() / weight.sum().clamp_min(1)
    return masked_mean(per_sample(kind, out, y, x), mask)


def per_sample(kind: str, out: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Per-sample losses [n] of the kind's built-in loss ('lm': the mean over real tokens)."""
    if kind == "classification":
        return cross_entropy(out, y)
    if kind == "multilabel":
        return binary_cross_entropy(out, y)
    if kind == "regression":
        return squared_error(out, y)
    if kind == "quadratic":
        return quadratic(out, y, x)
    if kind == "lm":
        ce, real = token_cross_entropy(out, y)
        return (ce * real).sum(-1) / real.sum(-1).clamp_min(1)
    raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(KINDS)})")


# ---- evaluation: sums over batches, then metrics --------------------------------------------

def eval_sums(kind: str, out: Tensor, y: Tensor, x: Tensor, custom: PerSampleLoss | None) -> Dict[str, Tensor]:
    """Returns the sums one evaluation batch adds (loss, counts), as float64 tensors."""
    sums: Dict[str, Tensor] = {}
    if kind == "lm" and custom is None:
        ce, real = token_cross_entropy(out, y)
        sums["loss"] = (ce * real).sum()
        sums["tokens"] = real.sum()
        sums["token_correct"] = ((out.argmax(-1) == y) & (y >= 0)).sum()
    else:
        loss = custom(out, y) if custom is not None else per_sample(kind, out, y, x)
        sums["loss"] = loss.sum()
    if kind == "classification":
        k = min(5, out.shape[-1])
        top = out.topk(k, dim=-1).indices
        sums["correct"] = (top[:, 0] == y).sum()
        sums["correct_top5"] = (top == y.unsqueeze(-1)).any(-1).sum()
    elif kind == "multilabel":
        pred, truth = out > 0, y > 0.5
        sums["tp"] = (pred & truth).sum(0)
        sums["fp"] = (pred & ~truth).sum(0)
        sums["fn"] = (~pred & truth).sum(0)
    elif kind == "regression":
        sums["abs_error"] = absolute_error(out, y).sum()
        sums["sq_error"] = squared_error(out, y).sum()
    return {k: v.detach().to(torch.float64) for k, v in sums.items()}


def _f1(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """F1 = 2tp / (2tp + fp + fn), 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def eval_metrics(kind: str, sums: Dict[str, Tensor], n: int, custom: bool) -> Dict[str, float | None]:
    """Turns the summed `eval_sums` of n test samples into the metrics row: 'loss' and
    'accuracy' (None where the kind has none) plus the kind's own ``test_*`` metrics."""
    n = max(n, 1)
    if kind == "lm" and not custom:
        tokens = max(float(sums["tokens"]), 1.0)
        loss = float(sums["loss"]) / tokens
        return {"loss": loss, "accuracy": None, "test_perplexity": float(torch.exp(torch.tensor(loss))),
                "test_token_accuracy": float(sums["token_correct"]) / tokens}
    result: Dict[str, float | None] = {"loss": float(sums["loss"]) / n, "accuracy": None}
    if kind == "classification":
        result["accuracy"] = float(sums["correct"]) / n
        result["test_top5_accuracy"] = float(sums["correct_top5"]) / n
    elif kind == "multilabel":
        tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
        result["test_micro_f1"] = float(_f1(tp.sum(), fp.sum(), fn.sum()))
        result["test_macro_f1"] = float(_f1(tp, fp, fn).mean())
    elif kind == "regression":
        result["test_mse"] = float(sums["sq_error"]) / n
        result["test_mae"] = float(sums["abs_error"]) / n
    return result


def add_sums(total: Dict[str, Tensor], part: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Adds one batch's sums into the running totals (in place) and returns them."""
    for k, v in part.items():
        total[k] = total[k] + v if k in total else v
    return total


def resolve_loss(name: str) -> PerSampleLoss | None:
    """Returns the per-sample loss `model.loss` names (None for 'auto': the task kind's own);
    raises ConfigError at `model.loss` for an unknown name or a module that cannot be imported."""
    return None if name == "auto" else LOSSES.get(name, "model.loss").factory
