"""When the metrics rows say that training diverged (beside NaN/inf updates, which the
protocols check as they aggregate).

Two rules, applied to the rows after each evaluation (a pure function of the rows and the
test set, so a resumed run decides as the uninterrupted one):

* the test loss is NaN or infinite;
* for `run.divergence_evals` evaluations in a row, the test loss is above
  `run.divergence_factor` × its initial value (the first row's, when that is > 0) and, where
  accuracy is measured, the test accuracy is at chance level: at most the share of the most
  common test class plus a tenth of the way from there to 1 (`chance_accuracy`).

A model blown up by a too large learning rate can keep finite parameters, a loss many times
that of the untrained model, and predict one class for every input. An unstable run that
still learns can have as high a loss for a while (asynchronous FedAvg with a large step,
Fraboni et al.'s instability), but not at chance accuracy.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from .config.schema import RunSection

SHOWN = ("round", "virtual_time", "test_accuracy", "test_loss")
CHANCE_SLACK = 0.1  # how far above the majority share an accuracy still counts as chance level


class Divergence(NamedTuple):
    """What diverged, and the row from before it that the error message quotes."""

    what: str
    last: dict[str, Any]  # {} when there is none
    label: str  # how the message names `last`


def chance_accuracy(labels: np.ndarray) -> float:
    """Returns the highest accuracy still at chance level on a test set with these labels:
    the most common label's share (what predicting it for every input scores) plus
    `CHANCE_SLACK` of the way from there to 1."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    share = float(counts.max() / counts.sum()) if len(counts) else 0.0
    return share + CHANCE_SLACK * (1.0 - share)


def _loss(row: dict[str, Any]) -> float | None:
    loss = row.get("test_loss")
    return None if loss is None else float(loss)


def last_finite(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Returns the newest row with a finite test loss ({} if none): a model can blow up
    between two evaluations, or before its update is found to hold NaN/inf."""
    return next((r for r in reversed(rows) if (loss := _loss(r)) is not None and math.isfinite(loss)), {})


def diverged(rows: Sequence[dict[str, Any]], run: RunSection, chance: float | None) -> Divergence | None:
    """Returns the `Divergence` that the newest row shows under the rules above, or None.
    `chance` is the test set's `chance_accuracy` (None: a task without accuracy)."""
    last = _loss(rows[-1]) if rows else None
    if last is None:
        return None
    where = f"round {rows[-1]['round']}, virtual time {rows[-1]['virtual_time']:.6g} s"
    if not math.isfinite(last):
        return Divergence(f"the test loss is {last} ({where})", last_finite(rows), "last finite metrics")
    initial = _loss(rows[0])
    factor, evals = run.divergence_factor, run.divergence_evals
    if factor is None or initial is None or not initial > 0 or len(rows) <= evals:
        return None
    limit = factor * initial

    def blown_up(row: dict[str, Any]) -> bool:
        loss, acc = _loss(row), row.get("test_accuracy")
        return loss is not None and loss > limit and (acc is None or chance is None or acc <= chance)

    if not all(blown_up(r) for r in rows[-evals:]):
        return None
    at_chance = "" if rows[-1].get("test_accuracy") is None or chance is None else \
        f" at chance accuracy (≤ {chance:.3g})"
    good = next((r for r in reversed(rows) if not blown_up(r)), {})
    return Divergence(f"the test loss has stayed above {factor:g} × its initial {initial:.4g}{at_chance} for "
                      f"{evals} evaluations (now {last:.4g}, {where}; run.divergence_factor)", good,
                      "last good metrics")


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """Returns the few metrics of `row` an error message quotes."""
    return {k: row.get(k) for k in SHOWN}


__all__ = ["Divergence", "chance_accuracy", "diverged", "last_finite", "shown"]
