"""FedProx, the FedOpt family and FedNova: equalities with FedAvg, closed forms, fixed points."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.strategy import LocalHP
from fedsim.strategies.fednova import fednova, step_weight_norm
from fedsim.strategies.fedopt import fedadagrad, fedadam, fedyogi
from fedsim.strategies.fedprox import fedprox

from .conftest import quadratic_config, run_config
from .handmade import one_round, quad_grad, quadratic, steps


def test_fedprox_mu0_equals_fedavg_exactly():
    cfg = {"run": {"rounds": 15, "eval_every": 15}}
    base = run_config(quadratic_config(**cfg))
    prox = run_config(quadratic_config(strategy={"name": "fedprox", "mu": 0.0}, **cfg))
    x_avg = base.protocol.eval_params(base.ctx, base.final_state)
    x_prox = prox.protocol.eval_params(prox.ctx, prox.final_state)
    assert torch.equal(x_avg, x_prox)
    assert base.rows[-1]["bytes_up"] == prox.rows[-1]["bytes_up"]


def test_fedprox_golden_two_steps():
    # f = ½·2(y − 3)², x = 0, μ = 1, η = 0.1: y1 = 0 − 0.1(2(0 − 3) + 0) = 0.6;
    # y2 = 0.6 − 0.1(2(0.6 − 3) + 1·0.6) = 0.6 − 0.1(−4.8 + 0.6) = 1.02; u = −1.02.
    s = fedprox(mu=1.0)
    state = s.init(torch.zeros(1, dtype=torch.float64))
    out = s.local(s.publish(state), {}, steps(2), quad_grad(2.0, [3.0]), LocalHP(lr=0.1))
    assert out.update.item() == pytest.approx(-1.02)


def test_fedprox_converges_to_its_closed_form_fixed_point():
    # Per client, K prox-SGD steps from x are affine: u_i = c_i (x − b_i) with
    # c_i = (1 − r_i^K) a_i / (a_i + μ), r_i = 1 − η(a_i + μ); the fixed point is Σ p_i c_i b_i / Σ p_i c_i.
    mu, eta, k = 0.5, 0.05, 10
    a, b, _ = quadratic(5, 3)
    clients = [(quad_grad(float(ai), bi), k) for ai, bi in zip(a, b)]
    s = fedprox(mu=mu)
    state = s.init(torch.zeros(3, dtype=torch.float64))
    for _ in range(150):
        state = one_round(s, state, clients, [0.2] * 5, LocalHP(lr=eta))
    c = (1 - (1 - eta * (a + mu)) ** k) * a / (a + mu)
    fixed = (c[:, None] * b).sum(0) / c.sum()
    assert np.abs(s.params(state).numpy() - fixed).max() < 1e-9
    w_avg = 1 - (1 - eta * a) ** k  # FedAvg's fixed point differs: μ changes where it lands
    assert np.abs(fixed - (w_avg[:, None] * b).sum(0) / w_avg.sum()).max() > 1e-3


TWO_CLIENTS = [(quad_grad(1.0, [0.0, 1.0]), 2), (quad_grad(2.0, [3.0, -1.0]), 2)]
WEIGHTS = [0.75, 0.25]


def mean_update(x0):
    """ū = Σ w_i u_i for TWO_CLIENTS from x0 (two SGD steps, η = 0.1), computed by hand-rolled loops."""
    total = np.zeros(2)
    for (a, b), w in zip([(1.0, [0.0, 1.0]), (2.0, [3.0, -1.0])], WEIGHTS):
        y = np.array(x0, dtype=float)
        for _ in range(2):
            y = y - 0.1 * a * (y - np.array(b))
        total += w * (np.array(x0) - y)
    return total


def test_fedadam_beta0_golden_closed_form():
    # β₁ = β₂ = 0: m = ū, v = ū², so x₁ = x₀ − η ū / (|ū| + τ) element-wise (Reddi et al., Alg. 2).
    eta, tau = 0.5, 0.1
    s = fedadam(server_lr=eta, beta1=0.0, beta2=0.0, tau=tau)
    state = one_round(s, s.init(torch.zeros(2, dtype=torch.float64)), TWO_CLIENTS, WEIGHTS)
    u = mean_update([0.0, 0.0])
    expected = -eta * u / (np.abs(u) + tau)
    assert s.params(state).numpy() == pytest.approx(expected, abs=1e-12)
    # and u itself by hand: client 0 (a=1, b=(0,1)): y = (0, 0.19), u0 = (0, −0.19);
    # client 1 (a=2, b=(3,−1)): y = (1.08, −0.36), u1 = (−1.08, 0.36); ū = (−0.27, −0.0525)
    assert u == pytest.approx([-0.27, -0.0525])


def test_fedadam_two_rounds_uses_v_init_tau_squared_and_no_bias_correction():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = fedadam(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    state = s.init(torch.zeros(2, dtype=torch.float64))
    x, m, v = np.zeros(2), np.zeros(2), np.full(2, tau**2)
    for _ in range(2):
        u = mean_update(x)
        m = b1 * m + (1 - b1) * u
        v = b2 * v + (1 - b2) * u**2
        x = x - eta * m / (np.sqrt(v) + tau)
        state = one_round(s, state, TWO_CLIENTS, WEIGHTS)
        assert s.params(state).numpy() == pytest.approx(x, abs=1e-12)


def test_fedadam_bias_correction_first_step_is_sign_like():
    # With Adam's bias correction the first step is η ū / (|ū| + τ) whatever β₁, β₂ (m̂ = ū, v̂ = ū²).
    s = fedadam(server_lr=0.5, beta1=0.9, beta2=0.99, tau=0.1, bias_correction=True)
    state = one_round(s, s.init(torch.zeros(2, dtype=torch.float64)), TWO_CLIENTS, WEIGHTS)
    u = mean_update([0.0, 0.0])
    assert s.params(state).numpy() == pytest.approx(-0.5 * u / (np.abs(u) + 0.1), abs=1e-12)


@pytest.mark.parametrize("name", ["yogi", "adagrad"])
def test_fedyogi_fedadagrad_first_step_closed_form(name):
    eta, b1, b2, tau = 0.2, 0.5, 0.9, 0.05
    u = mean_update([0.0, 0.0])
    v0 = tau**2
    if name == "yogi":
        s = fedyogi(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
        v = v0 - (1 - b2) * u**2 * np.sign(v0 - u**2)
    else:
        s = fedadagrad(server_lr=eta, beta1=b1, tau=tau)
        v = v0 + u**2
    state = one_round(s, s.init(torch.zeros(2, dtype=torch.float64)), TWO_CLIENTS, WEIGHTS)
    assert s.params(state).numpy() == pytest.approx(-eta * (1 - b1) * u / (np.sqrt(v) + tau), abs=1e-12)


def test_fednova_step_weight_norm():
    assert step_weight_norm(5, 0.0) == 5.0
    rho, tau = 0.9, 3  # a = [(1−ρ³), (1−ρ²), (1−ρ)]/(1−ρ) → ‖a‖₁ = 2.71 + 1.9 + 1 = 5.61
    assert step_weight_norm(tau, rho) == pytest.approx(5.61)


def test_fednova_golden_normalised_average():
    # Two 1-d clients, 1 and 3 steps, weights ½: u = τ_eff Σ w_i u_i / τ_i with τ_eff = 2.
    s = fednova()
    clients = [(quad_grad(1.0, [1.0]), 1), (quad_grad(1.0, [1.0]), 3)]
    state = one_round(s, s.init(torch.zeros(1, dtype=torch.float64)), clients, [0.5, 0.5])
    u0 = -0.1  # one step: y = 0.1
    u1 = -(1 - 0.9**3)  # three steps: y = 1 − 0.9³
    assert s.params(state).item() == pytest.approx(-2 * (0.5 * u0 / 1 + 0.5 * u1 / 3))


def test_fednova_removes_the_bias_toward_clients_with_more_steps():
    # Same curvature, 1 vs 10 local steps: FedAvg's fixed point leans toward the busy client's
    # optimum (weights 1 − (1 − ηa)^K); FedNova's uses (1 − (1 − ηa)^K)/K ≈ ηa — near the true mean.
    clients = [(quad_grad(1.0, [0.0]), 1), (quad_grad(1.0, [1.0]), 10)]
    from fedsim.strategies.fedavg import fedavg

    finals = {}
    for name, s in (("avg", fedavg()), ("nova", fednova())):
        state = s.init(torch.zeros(1, dtype=torch.float64))
        for _ in range(400):
            state = one_round(s, state, clients, [0.5, 0.5], LocalHP(lr=0.05))
        finals[name] = s.params(state).item()
    c = [1 - 0.95, 1 - 0.95**10]
    assert finals["avg"] == pytest.approx(c[1] / (c[0] + c[1]), abs=1e-9)  # ≈ 0.89
    assert finals["nova"] == pytest.approx((c[1] / 10) / (c[0] + c[1] / 10), abs=1e-9)  # ≈ 0.45
    assert abs(finals["nova"] - 0.5) < 0.1 < abs(finals["avg"] - 0.5)
