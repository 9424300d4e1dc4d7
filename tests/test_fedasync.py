"""FedAsync: the mixing rule by hand, with staleness and the proximal term; equal to FedAvg with
server LR α in synchronous rounds; the rule replayed exactly under the asynchronous protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.runner import build
from fedsim.contributions import contributions
from fedsim.strategy import CombineContext, LocalHP
from fedsim.strategies.fedasync import fedasync

from .conftest import quadratic_config, run_config
from .test_async_learning import Recorder, async_quadratic, drive
from .test_fedavg import quad_grad, two_steps


def test_mixing_golden_numbers():
    # x = 0; the client started from x_τ = 1 and uploads u = 0.4, so y = 0.6
    s = fedasync(alpha=0.5, staleness={"name": "polynomial", "a": 0.5})
    state = s.init(torch.zeros(1, dtype=torch.float64))
    msg = contributions([torch.tensor([0.4], dtype=torch.float64)], [1.0], staleness=[3], bases=torch.ones(1, dtype=torch.float64))
    new = s.combine(state, msg, CombineContext(1, 7, 0.0))
    # α_t = 0.5 · (1 + 3)^−½ = 0.25: x = 0.75·0 + 0.25·0.6
    assert s.params(new).item() == pytest.approx(0.15)
    assert s.params(state).item() == 0.0
    assert s.combine(state, msg.take([]), CombineContext(1, 7, 0.0)) is state


def test_hinge_staleness_keeps_alpha_up_to_b():
    s = fedasync(alpha=0.8, staleness={"name": "hinge", "a": 2.0, "b": 1})
    state = s.init(torch.zeros(1, dtype=torch.float64))
    base = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    mixed = [s.params(s.combine(state, contributions([zero], [1.0], staleness=[k], bases=base), CombineContext(1, 0, 0.0))).item()
             for k in (0, 1, 2, 3)]
    # s = 1, 1, 1/(2·1 + 1), 1/(2·2 + 1)
    assert mixed == pytest.approx([0.8, 0.8, 0.8 / 3, 0.8 / 5])


def test_proximal_local_steps_golden():
    # f = ½(x − 0)², x_τ = 1, η = 0.1, ρ = 1: y1 = 0.9; d2 = 0.9 + (0.9 − 1) = 0.8; y2 = 0.82
    s = fedasync(rho=1.0)
    payload = s.publish(s.init(torch.ones(1)))
    out = s.local(payload, {}, two_steps(), quad_grad(1.0, 0.0), LocalHP(lr=0.1))
    assert out.update.item() == pytest.approx(0.18)


def test_in_synchronous_rounds_fedasync_is_fedavg_with_server_lr_alpha():
    common = dict(protocol={"name": "sync", "weighting": "identical"}, run={"rounds": 8, "eval_every": 4})
    mixed = run_config(quadratic_config(strategy={"name": "fedasync", "alpha": 0.3}, **common))
    avg = run_config(quadratic_config(strategy={"name": "fedavg", "server_lr": 0.3}, **common))
    x_mixed = mixed.protocol.eval_params(mixed.ctx, mixed.final_state)
    x_avg = avg.protocol.eval_params(avg.ctx, avg.final_state)
    assert torch.allclose(x_mixed, x_avg, rtol=0, atol=1e-12)


def test_asynchronous_mixing_replayed_from_the_event_log():
    # x^{n+1} = (1 − α_n) x^n + α_n y_i with α_n = α (1 + s)^−½
    # and y_i = x^ρ − (1 − (1 − η a_i)^K)(x^ρ − b_i)
    eta, k, alpha = 0.05, 2, 0.6
    cfg = async_quadratic({}, n=5, budget=4.0, steps=k, lr=eta)
    cfg["strategy"] = {"name": "fedasync", "alpha": alpha, "staleness": {"name": "polynomial", "a": 0.5}}
    run = build(load_config(cfg))
    run.ctx.events = rec = Recorder()
    st = drive(run)
    a, b = run.ctx.task.info["curvature"], run.ctx.task.info["centers"]
    models = [np.zeros_like(b[0])]
    for _, kind, fields in rec.events:
        if kind == "aggregate":
            ev = json.loads(fields)
            (c,), (s,) = ev["clients"], ev["staleness"]
            base = models[len(models) - 1 - s]
            y = base - (1 - (1 - eta * a[c]) ** k) * (base - b[c])
            at = alpha * (1 + s) ** -0.5
            models.append((1 - at) * models[-1] + at * y)
    assert len(models) - 1 == st.aggregations > 10
    assert np.abs(run.protocol.eval_params(run.ctx, st).numpy() - models[-1]).max() < 1e-12
