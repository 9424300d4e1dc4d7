"""Differential privacy (strategies/dp.py, fedsim/privacy.py): clipping bounds every update,
noise has the configured scale and is keyed, noise 0 with a huge clip is the inner strategy
exactly, adaptive clipping follows its rule, and the accountant matches the library's
published values and is marked not valid where its assumptions fail."""
from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
import torch

from fedsim import privacy
from fedsim.config import load_config
from fedsim.contributions import contributions
from fedsim.errors import ConfigError
from fedsim.runner import build
from fedsim.strategy import Batches, CombineContext, LocalHP, ServerStrategy
from fedsim.strategies.dp import CLIP, UNCLIPPED, dp
from fedsim.strategies.fedavg import fedavg

from .conftest import quadratic_config, run_config

SEEN: list[torch.Tensor] = []


def recording(**knobs) -> ServerStrategy:
    """FedAvg that records every update its combine reads (an inner strategy for these tests)."""
    base = fedavg(**knobs)

    def combine(state, contribs, ctx):
        SEEN.append(contribs.updates.clone())
        return base.combine(state, contribs, ctx)

    return base._replace(combine=combine)


def test_clipping_bounds_every_update_the_inner_strategy_reads():
    SEEN.clear()
    cfg = quadratic_config(strategy={"name": "dp", "inner": "tests.test_dp:recording", "clip": 0.5,
                                     "noise_multiplier": 0.0}, run={"rounds": 4, "eval_every": 4})
    run_config(cfg)
    norms = torch.cat([torch.linalg.vector_norm(u, dim=1) for u in SEEN])
    assert len(norms) == 40 and float(norms.max()) <= 0.5 * (1 + 1e-12)
    assert float(norms.min()) > 0.49  # these updates are all longer than C: each was scaled to C


def _local_output(strategy, clip: float, grad: float):
    params = torch.zeros(3, dtype=torch.float64)
    batches = Batches(torch.zeros(2, 1, 3), torch.zeros(2, 1), torch.ones(2, 1))

    def grad_fn(x, batch):
        return torch.full_like(x, grad), torch.tensor(0.0)

    state = strategy.init(params)._replace(clip=clip)
    return strategy.local(strategy.publish(state), {}, batches, grad_fn, LocalHP(lr=1.0))


def test_local_clipping_keeps_short_updates_and_reports_the_unclipped_bit():
    s = dp(clip=1.0, noise_multiplier=0.0, adaptive_quantile=0.5)
    short = _local_output(s, 1.0, 0.1)  # u = 2 steps · 0.1 per coordinate: ‖u‖ = 0.2·√3 < 1
    torch.testing.assert_close(short.update, torch.full((3,), 0.2, dtype=torch.float64))
    assert float(short.extras[UNCLIPPED]) == 1.0
    long = _local_output(s, 1.0, 5.0)
    assert float(torch.linalg.vector_norm(long.update)) == pytest.approx(1.0)
    assert float(long.extras[UNCLIPPED]) == 0.0


def _zeros(m: int, d: int, weights=None):
    c = contributions(torch.zeros(m, d, dtype=torch.float64), weights or [1.0 / m] * m)
    return c.replace(jobs=np.arange(100, 100 + m))


@pytest.mark.parametrize("noise", ["central", "local"])
def test_noise_has_the_configured_scale_and_is_keyed(noise):
    m, d, z, c = 4, 40_000, 2.0, 0.5
    s = dp(clip=c, noise_multiplier=z, noise=noise)
    state = s.init(torch.zeros(d, dtype=torch.float64))
    step = state.inner.params - s.combine(state, _zeros(m, d), CombineContext(10, 3, 0.0)).inner.params
    # central: one draw of std z·C·max w = z·C/m; local: the mean of m draws of std z·C
    expected = z * c / m if noise == "central" else z * c / math.sqrt(m)
    assert float(step.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(step.mean())) < 4 * expected / math.sqrt(d)
    again = state.inner.params - s.combine(state, _zeros(m, d), CombineContext(10, 3, 0.0)).inner.params
    other = state.inner.params - s.combine(state, _zeros(m, d).replace(jobs=np.arange(m)), CombineContext(10, 4, 0.0)).inner.params
    assert torch.equal(step, again) and not torch.equal(step, other)


@pytest.mark.parametrize("protocol", [{"name": "sync", "clients_per_round": 4},
                                      {"name": "async", "concurrency": 3, "buffer_size": 2}])
@pytest.mark.parametrize("inner", ["fedavg", {"name": "fedadam", "server_lr": 0.1}])
def test_dp_with_no_noise_and_a_huge_clip_is_the_inner_strategy_exactly(protocol, inner):
    small = {"run": {"rounds": 4, "eval_every": 2}, "protocol": protocol}
    plain = run_config(quadratic_config(**small, strategy=inner if isinstance(inner, dict) else {"name": inner}))
    private = run_config(quadratic_config(**small, strategy={"name": "dp", "inner": inner, "clip": 1e12,
                                                             "noise_multiplier": 0.0}))
    a, b = (r.protocol.eval_params(r.ctx, r.final_state) for r in (plain, private))
    assert torch.equal(a, b)


def test_dp_runs_the_same_on_serial_and_vmap():
    def final(executor):
        run = run_config(quadratic_config(strategy={"name": "dp", "clip": 0.5, "noise_multiplier": 1.0,
                                                    "adaptive_quantile": 0.5, "count_noise": 1.0},
                                          protocol={"name": "sync", "clients_per_round": 4}, executor=executor,
                                          run={"rounds": 3, "eval_every": 3}))
        return run.protocol.eval_params(run.ctx, run.final_state), run.final_state.server.clip

    serial = final({"kind": "serial"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vm = final({"kind": "vmap", "device": "cpu"})
    torch.testing.assert_close(vm[0], serial[0], rtol=1e-5, atol=1e-7)
    assert vm[1] == pytest.approx(serial[1])


def test_adaptive_clipping_follows_the_geometric_rule_and_tracks_the_quantile():
    s = dp(clip=1.0, noise_multiplier=0.0, adaptive_quantile=0.3, clip_lr=0.2)
    norms = torch.arange(1, 11, dtype=torch.float64)  # update norms 1..10
    state = s.init(torch.zeros(1, dtype=torch.float64))
    first = None
    for version in range(300):
        below = (norms <= state.clip).to(torch.float64).unsqueeze(1)
        c = contributions(norms.unsqueeze(1), [0.1] * 10).replace(extras={UNCLIPPED: below})
        new = s.combine(state, c, CombineContext(10, version, 0.0))
        if first is None:
            first = new.clip
            assert first == pytest.approx(1.0 * math.exp(-0.2 * (float(below.mean()) - 0.3)))
        state = new
    assert 3.0 <= state.clip <= 4.0  # 30% of the norms are ≤ C


def test_accountant_matches_the_libraries_published_values():
    # dp-accounting's own test: a Gaussian mechanism with σ = 4.530877117 is exactly (1, 1e-6)-DP
    once = privacy.Mechanism(4.530877117, 1, 1, "poisson")
    assert privacy.epsilon(once, 1, 1e-6, "rdp") == pytest.approx(1.0, abs=1e-3)
    # the PLD accountant is exact for one Gaussian mechanism (up to discretisation): its ε solves
    # the analytic δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ) (Balle & Wang, ICML 2018, Thm. 8)
    eps = privacy.epsilon(once, 1, 1e-6, "pld")
    phi, sigma = NormalDist().cdf, 4.530877117
    exact_delta = phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)
    assert exact_delta == pytest.approx(1e-6, rel=0.05) and eps < 1.0
    sampled = privacy.Mechanism(1.0, 1000, 10, "poisson")
    assert privacy.epsilon(sampled, 200, 1e-5, "pld") <= privacy.epsilon(sampled, 200, 1e-5, "rdp")


def test_calibration_reaches_the_target_epsilon():
    mech = privacy.Mechanism(1.0, 100, 10, "fixed")
    z = privacy.calibrate(8.0, mech, 20, 1e-5)
    from dataclasses import replace

    assert privacy.epsilon(replace(mech, noise_multiplier=z), 20, 1e-5) == pytest.approx(8.0, rel=1e-3)


def test_rows_report_epsilon_for_sync_runs_and_calibrate_a_target():
    run = run_config(quadratic_config(strategy={"name": "dp", "target_epsilon": 8.0, "clip": 1.0},
                                      protocol={"name": "sync", "clients_per_round": 5},
                                      run={"rounds": 6, "eval_every": 3}))
    rows = run.rows
    z = rows[-1]["dp_noise_multiplier"]
    mech = privacy.Mechanism(z, 10, 5, "fixed")
    assert rows[0]["dp_epsilon"] == 0.0
    assert rows[1]["dp_epsilon"] == pytest.approx(privacy.epsilon(mech, 3, 1e-5))
    assert rows[-1]["dp_epsilon"] == pytest.approx(8.0, rel=1e-3)


def test_async_rows_say_epsilon_is_not_valid_and_a_target_is_refused():
    run = run_config(quadratic_config(strategy={"name": "dp"}, protocol={"name": "async", "concurrency": 3, "buffer_size": 2},
                                      run={"rounds": 2, "eval_every": 2}))
    assert run.rows[-1]["dp_epsilon"] is None and "protocol 'async'" in run.rows[-1]["dp_epsilon_note"]
    with pytest.raises(ConfigError, match="^strategy: target_epsilon cannot be calibrated"):
        build(load_config(quadratic_config(strategy={"name": "dp", "target_epsilon": 1.0},
                                           protocol={"name": "async", "concurrency": 3, "buffer_size": 2})))
    with pytest.raises(ConfigError, match="count_noise"):
        build(load_config(quadratic_config(strategy={"name": "dp", "adaptive_quantile": 0.5, "count_noise": 0.1})))


def test_dp_inside_another_wrapper_still_accounts_and_dp_refuses_encoded_inner_updates():
    run = run_config(quadratic_config(strategy={"name": "compressed", "compressor": {"name": "topk", "ratio": 0.5},
                                                "inner": {"name": "dp", "noise_multiplier": 2.0}},
                                      protocol={"name": "sync", "clients_per_round": 5}, run={"rounds": 2, "eval_every": 2}))
    assert run.rows[-1]["dp_epsilon"] == pytest.approx(privacy.epsilon(privacy.Mechanism(2.0, 10, 5, "fixed"), 2, 1e-5))
    with pytest.raises(ConfigError, match="^strategy: inner strategy 'compressed' sends encoded messages"):
        build(load_config(quadratic_config(strategy={"name": "dp", "inner": "compressed"})))
