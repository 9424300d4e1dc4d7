"""Task kinds: each kind's loss and metrics equal a direct computation (scikit-learn's F1,
torch's losses), runs of every kind train on serial and vmap alike, and a user's loss by
dotted path replaces the kind's."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedsim import losses
from fedsim.errors import ConfigError

from .conftest import run_config
from .test_vmap_executor import compare_runs, final_params


def kind_config(source: str, model: dict, **extra) -> dict:
    cfg = {
        "name": source, "seed": 2,
        "data": {"name": f"tests.tiny_sources:{source}", "num_clients": 3, "partition": "iid"},
        "model": model,
        "local": {"lr": 0.1, "batch_size": 8, "steps": 3},
        "run": {"rounds": 3, "eval_every": 3, "progress": False},
    }
    cfg.update(extra)
    return cfg


def evaluate_directly(run):
    """The final model's outputs on the test set, and the test targets."""
    task, src = run.ctx.task, run.ctx.data.source
    with torch.no_grad():
        task.module.eval()
        out = task.forward(final_params(run), src.x_test)
        task.module.train()
    return out, src.y_test


def test_top1_and_top5_accuracy():
    out = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [1.0, 2, 3, 4, 5, 6, 7], [0.0, 0, 0, 0, 0, 0, 1]])
    y = torch.tensor([0, 1, 5])  # top-1 right; 6th of 7 (not in the top 5); 2nd (ties: in the top 5)
    sums = losses.eval_sums("classification", out, y, out, None)
    m = losses.eval_metrics("classification", sums, 3, False)
    assert m["accuracy"] == pytest.approx(1 / 3) and m["test_top5_accuracy"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(float(F.cross_entropy(out, y)))


def test_multilabel_f1_equals_scikit_learn_and_vmap_equals_serial():
    from sklearn.metrics import f1_score

    a, _ = compare_runs(kind_config("multilabel", {"name": "mlp", "hidden": [16]}))
    out, y = evaluate_directly(a)
    pred, truth = (out > 0).numpy().astype(int), y.numpy().astype(int)
    row = a.rows[-1]
    assert row["test_accuracy"] is None
    assert row["test_micro_f1"] == pytest.approx(f1_score(truth, pred, average="micro", zero_division=0))
    assert row["test_macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro", zero_division=0))
    assert row["test_loss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(out, y)), rel=1e-6)


def test_regression_mse_and_mae():
    a, _ = compare_runs(kind_config("regression", {"name": "mlp", "hidden": [8]}))
    out, y = evaluate_directly(a)
    row = a.rows[-1]
    assert row["test_mse"] == pytest.approx(float(F.mse_loss(out.squeeze(-1), y)), rel=1e-6)
    assert row["test_loss"] == pytest.approx(row["test_mse"], rel=1e-9)
    assert row["test_mae"] == pytest.approx(float(F.l1_loss(out.squeeze(-1), y)), rel=1e-6)
    assert a.rows[-1]["test_loss"] < a.rows[0]["test_loss"]  # it learns


def test_next_token_lm_masks_padding_and_reports_perplexity():
    cfg = kind_config("tokens", {"name": "transformer_lm", "width": 16, "heads": 2, "layers": 1, "mlp": 32})
    run = run_config(cfg)
    out, y = evaluate_directly(run)
    assert (y < 0).any()  # the source pads
    ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-1)
    real = y >= 0
    row = run.rows[-1]
    assert row["test_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert row["test_perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert row["test_token_accuracy"] == pytest.approx(float((out.argmax(-1) == y)[real].float().mean()))
    # training: a batch's loss is the mean over its real tokens; padding targets change nothing
    task, params = run.ctx.task, final_params(run)
    from fedsim.strategy import Batch
    x = run.ctx.data.x_train[:4]
    target = (x + 1) % 11
    cut = target.clone()
    cut[:, -3:] = -1
    loss = task.loss(params, Batch(x, cut, torch.ones(4)))
    logits = task.forward(params, x)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits[:, :-3].reshape(-1, 11), target[:, :-3].reshape(-1))), rel=1e-5)


def test_custom_loss_by_dotted_path_trains_and_is_the_test_loss():
    model = {"name": "mlp", "hidden": [8]}
    mine = run_config(kind_config("regression", {**model, "loss": "tests.tiny_sources:l1_loss"}))
    builtin = run_config(kind_config("regression", {**model, "loss": "absolute_error"}))
    default = run_config(kind_config("regression", model))
    assert torch.allclose(final_params(mine), final_params(builtin), atol=1e-6)
    assert not torch.allclose(final_params(mine), final_params(default), atol=1e-3)
    row = mine.rows[-1]
    assert row["test_loss"] == pytest.approx(row["test_mae"], rel=1e-6)


def test_unknown_loss_is_one_line_at_model_loss():
    with pytest.raises(ConfigError, match=r"model\.loss") as err:
        run_config(kind_config("regression", {"name": "mlp", "loss": "huber"}))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.loss"):
        run_config(kind_config("regression", {"name": "mlp", "loss": "tests.tiny_sources:nope"}))


def test_f1_of_an_empty_label_is_zero_as_in_scikit_learn():
    tp, fp, fn = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])
    assert np.allclose(losses._f1(tp, fp, fn).numpy(), [2 * 2 / (4 + 2), 0.0])
