"""Merge rules: plain averaging shrinks the variance of independent models; VCA restores it exactly."""
from __future__ import annotations

import pytest
import torch

from fedsim.merge import mix, tensor_variances, variance_corrected
from fedsim.params import ParamLayout

LAYOUT = ParamLayout(("w1", "b1", "w2"), ((30, 20), (30,), (10, 30)))


def independent_models(n: int, seed: int = 0) -> torch.Tensor:
    """n independent models; each tensor ℓ ~ N(μ_ℓ, σ_ℓ²) with its own scale, as after an init."""
    gen = torch.Generator().manual_seed(seed)
    parts = [0.3 + 0.5 * torch.randn(n, 600, generator=gen, dtype=torch.float64),
             0.05 * torch.randn(n, 30, generator=gen, dtype=torch.float64),
             -0.1 + 2.0 * torch.randn(n, 300, generator=gen, dtype=torch.float64)]
    return torch.cat(parts, dim=1)


def average_of(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(models [1 + n, d], weights [1, 1 + n], own [1]): a receiver whose own model (row 0) has
    weight 0, averaging the n others (the 'train 0 / average 100' case)."""
    models = independent_models(n + 1)
    weights = torch.tensor([[0.0] + [1.0 / n] * n], dtype=torch.float64)
    return models, weights, torch.zeros(1, dtype=torch.long)


def test_plain_average_of_independent_models_loses_variance():
    n = 16
    models, weights, own = average_of(n)
    var_in = tensor_variances(models[1:], LAYOUT).mean(0)
    var_avg = tensor_variances(mix(models, weights, own, LAYOUT), LAYOUT)[0]
    ratio = var_avg / var_in
    assert torch.all((ratio > 0.5 / n) & (ratio < 2.0 / n))  # ≈ σ²/n: the vanishing variance


def test_vca_keeps_mean_exactly_and_restores_the_mean_input_variance():
    n = 16
    models, weights, own = average_of(n)
    plain = mix(models, weights, own, LAYOUT)
    vca = variance_corrected(models, weights, own, LAYOUT)
    for (name, sl, _), target in zip(LAYOUT.slices(), tensor_variances(models[1:], LAYOUT).mean(0)):
        assert vca[0, sl].mean().item() == pytest.approx(plain[0, sl].mean().item(), abs=1e-14), name
        assert vca[0, sl].var(unbiased=False).item() == pytest.approx(target.item(), rel=1e-12), name
    # the rescaling is around the mean: the deviations keep their direction
    for _, sl, _ in LAYOUT.slices():
        a, b = plain[0, sl] - plain[0, sl].mean(), vca[0, sl] - vca[0, sl].mean()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() == pytest.approx(1.0, abs=1e-12)


def test_vca_target_leaves_out_the_receivers_own_model():
    # train 50 / average 50: a = ½ own + ½ mean(received); target = mean Var(received), own excluded
    models = independent_models(4, seed=2)
    models[0] *= 10.0  # a very different own model must not move the target
    weights = torch.tensor([[0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]], dtype=torch.float64)
    out = variance_corrected(models, weights, torch.zeros(1, dtype=torch.long), LAYOUT)
    target = tensor_variances(models[1:], LAYOUT).mean(0)
    assert torch.allclose(tensor_variances(out, LAYOUT)[0], target, rtol=1e-12, atol=0)


def test_vca_on_a_whole_stack_uses_each_rows_own_index():
    models = independent_models(5, seed=3)
    w = torch.full((5, 5), 0.2, dtype=torch.float64)
    out = variance_corrected(models, w, torch.arange(5), LAYOUT)
    var = tensor_variances(models, LAYOUT)
    for r in range(5):
        others = torch.cat([var[:r], var[r + 1:]]).mean(0)
        assert torch.allclose(tensor_variances(out[r:r + 1], LAYOUT)[0], others, rtol=1e-12, atol=0)


def test_vca_changes_nothing_when_models_agree():
    # the control: a shared model merged with copies of itself is left as it is
    x = independent_models(1)[0]
    models = x.repeat(4, 1)
    weights = torch.tensor([[0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]], dtype=torch.float64)
    out = variance_corrected(models, weights, torch.zeros(1, dtype=torch.long), LAYOUT)
    assert torch.allclose(out[0], x, atol=1e-14, rtol=0)


def test_zero_variance_tensor_is_left_alone():
    models = independent_models(3)
    models[:, 600:630] = 0.0  # zero-initialised biases
    weights = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    out = variance_corrected(models, weights, torch.zeros(1, dtype=torch.long), LAYOUT)
    assert torch.equal(out[0, 600:630], torch.zeros(30, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_receiver_with_nothing_received_keeps_the_plain_mix():
    models = independent_models(3)
    w = torch.eye(3, dtype=torch.float64)  # nobody received anything
    assert torch.equal(variance_corrected(models, w, torch.arange(3), LAYOUT), models)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_weights_give_the_dense_result():
    models = independent_models(6)
    w = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    sparse = w.to_sparse_csr()
    own = torch.arange(6)
    assert torch.allclose(mix(models, sparse, own, LAYOUT), mix(models, w, own, LAYOUT), atol=1e-14, rtol=0)
    assert torch.allclose(variance_corrected(models, sparse, own, LAYOUT), variance_corrected(models, w, own, LAYOUT),
                          atol=1e-14, rtol=0)
