"""Momentum and control variates: fixed points on heterogeneous quadratics, reductions to
FedAvg / SCAFFOLD at β = 1, the VR estimator's exactness, a hand-computed direction, and the
bytes each sends."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.strategies.scaffold_m import scaffold_m_vr
from fedsim.strategy import Batches, LocalHP, Payload

from .conftest import quadratic_config, run_config
from .test_fedavg import quad_grad

ETA, K = 0.05, 10  # quadratic_config's local.lr and local.steps
PARTIAL = {"name": "sync", "clients_per_round": 3}


def final(run) -> np.ndarray:
    return run.protocol.eval_params(run.ctx, run.final_state).numpy()


def quad(strategy: dict, rounds: int, protocol: dict | None = None, **extra):
    cfg = quadratic_config(strategy=strategy, run={"rounds": rounds, "eval_every": rounds}, **extra)
    if protocol:
        cfg["protocol"] = protocol
    return run_config(cfg)


def fedavg_fixed_point(info: dict, lr: float) -> np.ndarray:
    """x_FA = Σ w_i b_i / Σ w_i with w_i = 1 − (1 − lr·a_i)^K (full participation, exact gradients)."""
    w = 1 - (1 - lr * info["curvature"]) ** K
    return (w[:, None] * info["centers"]).sum(0) / w.sum()


@pytest.mark.parametrize(
    "strategy, protocol, rounds",
    [
        ({"name": "scaffold"}, None, 50),
        ({"name": "scaffold"}, PARTIAL, 250),
        ({"name": "scaffold", "option": "I"}, None, 30),
        ({"name": "scaffold_m", "beta": 0.5}, None, 55),
        ({"name": "scaffold_m", "beta": 0.3}, PARTIAL, 200),
        ({"name": "scaffold_m_vr", "beta": 0.5}, None, 55),
    ],
    ids=["scaffold-full", "scaffold-partial", "scaffold-optionI-full", "scaffold_m-full",
         "scaffold_m-partial", "scaffold_m_vr-full"],
)
def test_control_variates_reach_the_true_optimum(strategy, protocol, rounds):
    # With heterogeneous curvatures FedAvg is biased, but SCAFFOLD (η_g = 1) and SCAFFOLD-M
    # converge to x* = Σ a_i b_i / Σ a_i exactly.
    run = quad(strategy, rounds, protocol)
    info = run.ctx.task.info
    assert np.abs(final(run) - info["optimum"]).max() < 1e-9
    assert np.linalg.norm(fedavg_fixed_point(info, ETA) - info["optimum"]) > 0.05  # FedAvg would miss it


def test_fedavg_m_converges_to_fedavg_fixed_point_at_local_lr_eta_beta():
    # At a fixed point g = 0, so clients run plain SGD at lr ηβ: momentum shrinks client
    # drift (by β) but does not remove it at a fixed η.
    beta = 0.5
    run = quad({"name": "fedavg_m", "beta": beta}, 80)
    info = run.ctx.task.info
    x = final(run)
    assert np.abs(x - fedavg_fixed_point(info, ETA * beta)).max() < 1e-12
    assert np.abs(x - fedavg_fixed_point(info, ETA)).max() > 1e-3
    assert np.linalg.norm(x - info["optimum"]) < np.linalg.norm(fedavg_fixed_point(info, ETA) - info["optimum"])


@pytest.mark.parametrize("name", ["fedavg_m", "fedavg_m_vr"])
def test_fedavg_m_with_beta_one_is_fedavg_with_global_lr_gamma_over_eta_k(name):
    # β = 1: d = ∇F_i(y; ξ) exactly; x^{r+1} = x^r − γ g^{r+1} = x^r − (γ/(ηK)) Σ w_i u_i.
    gamma = 0.3
    server_lr = gamma / (ETA * K)
    m = quad({"name": name, "beta": 1.0, "server_lr": server_lr}, 15, PARTIAL)
    f = quad({"name": "fedavg", "server_lr": server_lr}, 15, PARTIAL)
    assert torch.equal(m.protocol.eval_params(m.ctx, m.final_state), f.protocol.eval_params(f.ctx, f.final_state))


def test_fedavg_m_vr_with_one_local_step_and_exact_gradients_is_gradient_descent():
    # The VR estimate g^{r+1} = Σ_i w_i ∇F_i(x^r) + (1 − β)(g^r − Σ_i w_i ∇F_i(x^{r−1})) is exact
    # once g^1 is (g0='first_round'): the run is GD with step γ = η_g·η, i.e. FedAvg with K = 1 —
    # for any β, where FedAvg-M (an average of old gradients) is not.
    one_step = {"local": {"lr": ETA, "batch_size": 1, "steps": 1}}
    gd = quad({"name": "fedavg", "server_lr": 4.0}, 12, **one_step)
    vr = quad({"name": "fedavg_m_vr", "beta": 0.1, "server_lr": 4.0}, 12, **one_step)
    m = quad({"name": "fedavg_m", "beta": 0.1, "server_lr": 4.0}, 12, **one_step)
    np.testing.assert_allclose(final(vr), final(gd), rtol=0, atol=1e-12)
    assert np.abs(final(m) - final(gd)).max() > 1e-3


def test_fedavg_m_vr_converges_to_fedavg_fixed_point_at_local_lr_eta():
    # With K steps and g = 0 at a fixed point, client i's path from x gives
    # x − y_K = β·(1 − (1 − ηa_i)^K)·(x − b_i): FedAvg's fixed point at lr η (not ηβ as
    # FedAvg-M): the VR term undoes momentum's reduction of client drift.
    run = quad({"name": "fedavg_m_vr", "beta": 0.5}, 120)
    info = run.ctx.task.info
    assert np.abs(final(run) - fedavg_fixed_point(info, ETA)).max() < 1e-9


@pytest.mark.parametrize("name", ["scaffold_m", "scaffold_m_vr"])
def test_scaffold_m_with_beta_one_is_scaffold(name):
    # β = 1: SCAFFOLD's option II c_i − c + u/(Kη) equals the mean of the path gradients.
    m = quad({"name": name, "beta": 1.0}, 15, PARTIAL)
    s = quad({"name": "scaffold"}, 15, PARTIAL)
    np.testing.assert_allclose(final(m), final(s), rtol=0, atol=1e-12)
    for c in s.ctx.store.clients():
        torch.testing.assert_close(m.ctx.store.get(c)["c"], s.ctx.store.get(c)["c"], rtol=0, atol=1e-12)


def test_scaffold_m_vr_direction_by_hand():
    # Prepare: f(x) = ½·2·(x − 3)², so ∇F(y) = 2(y − 3). η = 0.1, β = 0.5, K = 2,
    # x = 1, x^{r−1} = 0, c = 0.4, c_i = 1, ηg = 0.3 (g = 3).
    local = scaffold_m_vr(beta=0.5).local
    payload = Payload(torch.tensor([1.0], dtype=torch.float64),
                      {"c": torch.tensor([0.4], dtype=torch.float64), "g": torch.tensor([0.3], dtype=torch.float64),
                       "prev": torch.tensor([0.0], dtype=torch.float64)})
    state = {"c": torch.tensor([1.0], dtype=torch.float64)}
    z = torch.zeros(2, 1, 1, dtype=torch.float64)
    batches = Batches(z, torch.zeros(2, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
    # Execute
    out = local(payload, state, batches, quad_grad(2.0, 3.0), LocalHP(lr=0.1))
    # By hand, d = β(G − c_i + c) + (1 − β)(g + G − G(x^{r−1})), G(x^{r−1}) = 2(0 − 3) = −6:
    # y0 = 1: G = −4, d = 0.5(−4 − 0.6) + 0.5(3 − 4 + 6) = 0.2, y1 = 0.98
    # y1:     G = −4.04, d = 0.5(−4.64) + 0.5(3 − 4.04 + 6) = 0.16, y2 = 0.964
    # c_i⁺ = mean G = −4.02; Δc_i = −5.02; u = x − y2 = 0.036
    assert out.update.item() == pytest.approx(0.036)
    assert out.state["c"].item() == pytest.approx(-4.02)
    assert out.extras["dc"].item() == pytest.approx(-5.02)
    assert state["c"].item() == 1.0  # the input state is not mutated


@pytest.mark.parametrize(
    "name, up, down, first_down",
    [("scaffold", 2, 2, 2), ("fedavg_m", 1, 2, 1), ("scaffold_m", 2, 3, 2), ("fedavg_m_vr", 1, 3, 2),
     ("scaffold_m_vr", 2, 4, 3)],
)
def test_bytes_count_every_vector_sent(name, up, down, first_down):
    # SCAFFOLD sends x and c down, u_i and Δc_i up; momentum adds g down (not in round 0 with
    # the default g0='first_round'); VR adds x^{r−1} down. Model-sized vectors per client:
    rounds = 3
    runs = {n: quad({"name": n}, rounds, PARTIAL) for n in ("fedavg", name)}
    base, alg = runs["fedavg"].final_state, runs[name].final_state
    assert alg.bytes_up == up * base.bytes_up
    assert alg.bytes_down * rounds == (first_down + (rounds - 1) * down) * base.bytes_down
    zero = quad({"name": name, "g0": "zero"} if "_m" in name else {"name": name}, rounds, PARTIAL).final_state
    assert zero.bytes_down == down * base.bytes_down
