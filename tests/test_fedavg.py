"""FedAvg: golden numbers on hand-made clients, and the closed-form fixed point on the quadratic task."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.protocols.weighting import aggregation_weights
from fedsim.contributions import contributions
from fedsim.strategy import Batch, Batches, CombineContext, LocalHP
from fedsim.strategies.fedavg import fedavg

from .conftest import quadratic_config, run_config


def quad_grad(a: float, b: float):
    """Gradient of ½ a (x − b)² — a hand-made client."""

    def grad_fn(x: torch.Tensor, batch: Batch):
        return a * (x - b), 0.5 * a * ((x - b) ** 2).sum()

    return grad_fn


def two_steps() -> Batches:
    z = torch.zeros(2, 1, 1, dtype=torch.float64)
    return Batches(z, torch.zeros(2, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))


def test_golden_two_clients_two_steps():
    # Prepare: client 0: a=1, b=0 (already optimal at x=0); client 1: a=2, b=3; x0 = 0, η = 0.1, K = 2.
    s = fedavg(server_lr=0.5)
    state = s.init(torch.zeros(1, dtype=torch.float64))
    hp = LocalHP(lr=0.1)
    payload = s.publish(state)
    # Execute
    out0 = s.local(payload, {}, two_steps(), quad_grad(1.0, 0.0), hp)
    out1 = s.local(payload, {}, two_steps(), quad_grad(2.0, 3.0), hp)
    # client 1 by hand: y1 = 0 + 0.1·2·3 = 0.6; y2 = 0.6 + 0.1·2·2.4 = 1.08; u1 = x0 − y2 = −1.08
    assert out0.update.item() == pytest.approx(0.0)
    assert out1.update.item() == pytest.approx(-1.08)
    w = aggregation_weights("samples", [0, 1], [30, 10])  # n = 30 and 10 samples
    msgs = contributions([out0.update, out1.update], w)
    new = s.combine(state, msgs, CombineContext(2, 0, 0.0))
    # Assert: u = 0.75·0 + 0.25·(−1.08) = −0.27; x1 = 0 − 0.5·(−0.27) = 0.135
    assert s.params(new).item() == pytest.approx(0.135)
    # and the input state was not mutated
    assert s.params(state).item() == 0.0


def test_golden_server_momentum_three_rounds():
    # FedAvgM: v ← βv + u, x ← x − η_g v with a constant pseudo-gradient u = −1.
    s = fedavg(server_lr=1.0, server_momentum=0.5)
    state = s.init(torch.zeros(1))
    xs = []
    for r in range(3):
        state = s.combine(state, contributions([torch.tensor([-1.0])], [1.0]), CombineContext(1, r, 0.0))
        xs.append(s.params(state).item())
    # v: 1, 1.5, 1.75 → x: 1, 2.5, 4.25
    assert xs == pytest.approx([1.0, 2.5, 4.25])


def test_quadratic_converges_to_fedavg_fixed_point():
    # (docs/algorithms.md, FedAvg): with heterogeneous curvatures, FedAvg (full participation, K steps,
    # deterministic gradients) converges to x_FA = Σ w_i b_i / Σ w_i, w_i = 1 − (1 − η a_i)^K,
    # not to the true optimum x* = Σ a_i b_i / Σ a_i.
    run = run_config(quadratic_config(run={"rounds": 300, "eval_every": 100}))
    info = run.ctx.task.info
    a, b = info["curvature"], info["centers"]
    eta, k = 0.05, 10
    w = 1 - (1 - eta * a) ** k
    x_fa = (w[:, None] * b).sum(0) / w.sum()
    x_final = run.protocol.eval_params(run.ctx, run.final_state).numpy()
    assert np.abs(x_final - x_fa).max() < 1e-9
    assert np.linalg.norm(x_fa - info["optimum"]) > 0.05  # the bias is real, not a rounding effect
    assert run.rows[-1]["dist_to_opt"] == pytest.approx(np.linalg.norm(x_fa - info["optimum"]), rel=1e-6)
