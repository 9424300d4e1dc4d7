"""CO2: reduces to Local SGD, follows its one-step-stale recursion by hand, clips for real."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.contributions import contributions
from fedsim.strategy import CombineContext, LocalHP
from fedsim.strategies.co2 import co2

from .conftest import quadratic_config, run_config
from .handmade import one_round, quad_grad, quadratic

CTX = CombineContext(1, 0, 0.0)


def final(run):
    return run.protocol.eval_params(run.ctx, run.final_state)


def test_mu0_alpha1_no_staleness_is_local_sgd():
    cfg = {"run": {"rounds": 12, "eval_every": 12}}
    local_sgd = run_config(quadratic_config(**cfg))  # FedAvg with η_g = 1 = periodic model averaging
    c = run_config(quadratic_config(strategy={"name": "co2", "outer_momentum": 0.0, "outer_lr": 1.0,
                                              "gap_penalty": 1.0, "stale": False}, **cfg))
    assert torch.equal(final(local_sgd), final(c))


def test_one_step_stale_recursion_by_hand():
    # Averaged pseudo-gradients d_0, d_1, d_2 arrive; outer step t uses d_{t−1}:
    # t=0: nothing yet; t=1: m = d_0/λ; t=2: m = β m + d_1/λ; x ← x − α m.
    beta, alpha, lam = 0.5, 0.8, 2.0
    s = co2(outer_lr=alpha, outer_momentum=beta, gap_penalty=lam)
    state = s.init(torch.zeros(2, dtype=torch.float64))
    ds = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, -2.0], [0.5, 0.5], [-1.0, 4.0])]
    xs = []
    for d in ds:
        state = s.combine(state, contributions([d], [1.0]), CTX)
        xs.append(s.params(state).clone())
    m1 = ds[0] / lam
    m2 = beta * m1 + ds[1] / lam
    assert torch.equal(xs[0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(xs[1], -alpha * m1)
    assert torch.allclose(xs[2], -alpha * m1 - alpha * m2)
    assert torch.equal(state.in_flight, ds[2])


def test_stale_step_uses_the_pseudo_gradient_from_the_anchor_its_phase_started_at():
    # One worker, f = ½(x − 3)², η = 0.1, K = 1, β = 0.5, α = λ = 1, x_0 = 0. Phase t starts at
    # anchor x_t and sends d_t = x_t − y_t with y_t = x_t − 0.1(x_t − 3); step t applies d_{t−1}:
    #   t=0: d_0 = −0.3, no step yet            → x_1 = 0
    #   t=1: d_1 = −0.3; m = d_0 = −0.3          → x_2 = 0.3
    #   t=2: d_2 = −0.27; m = −0.15 + d_1 = −0.45 → x_3 = 0.75
    #   t=3: m = −0.225 + d_2 = −0.495           → x_4 = 1.245
    # (Reading the released code's x_anchor − x̄ as x_t − x̄_{t−1} instead gives x_3 = 0.45.)
    s = co2(outer_lr=1.0, outer_momentum=0.5, gap_penalty=1.0)
    state = s.init(torch.zeros(1, dtype=torch.float64))
    anchors = []
    for t in range(4):
        state = one_round(s, state, [(quad_grad(1.0, [3.0]), 1)], [1.0], LocalHP(lr=0.1), round_=t)
        anchors.append(s.params(state).item())
    assert anchors == pytest.approx([0.0, 0.3, 0.75, 1.245], abs=1e-12)


def test_outer_momentum_is_clipped_elementwise():
    # The released code's clamp is out of place, so its clipping is a no-op; here it clips.
    s = co2(outer_lr=1.0, outer_momentum=0.9, clip=0.3, stale=False)
    state = s.init(torch.zeros(3, dtype=torch.float64))
    for _ in range(5):
        state = s.combine(state, contributions([torch.tensor([1.0, -0.02, -5.0], dtype=torch.float64)], [1.0]), CTX)
    assert state.momentum.tolist() == pytest.approx([0.3, -0.02 * (1 - 0.9**5) / (1 - 0.9), -0.3])
    assert s.params(state).tolist()[0] == pytest.approx(-1.5)  # five steps of exactly φ


def test_stale_co2_converges_to_the_local_sgd_fixed_point():
    # One-step staleness changes the path, not the fixed point: d(x) = 0 ⇔ x = Local SGD's
    # x_LS = Σ w_i b_i / Σ w_i with w_i = 1 − (1 − ηa_i)^K, not x*.
    a, b, opt = quadratic(8, 4)
    clients = [(quad_grad(float(ai), bi), 10) for ai, bi in zip(a, b)]
    s = co2(outer_lr=0.8, outer_momentum=0.2)
    state = s.init(torch.zeros(4, dtype=torch.float64))
    for r in range(200):
        state = one_round(s, state, clients, [1 / 8] * 8, LocalHP(lr=0.05), round_=r)
    w = 1 - (1 - 0.05 * a) ** 10
    x_ls = (w[:, None] * b).sum(0) / w.sum()
    assert np.abs(s.params(state).numpy() - x_ls).max() < 1e-10
    assert np.abs(x_ls - opt).max() > 1e-3
