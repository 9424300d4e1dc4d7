"""Synchronous decentralized protocol and strategies: equivalences with FedAvg, SAM, momentum, accounting."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.sam import sam
from fedsim.strategy import Batches, LocalHP, Payload
from fedsim.strategies.dfedavg import dfedavgm

from .conftest import merge, quadratic_config, run_config


def dec_config(**sections):
    """A small decentralized digits run: 8 nodes on a ring, 3 local steps, 3 rounds."""
    cfg = {
        "name": "dec",
        "seed": 0,
        "data": {"name": "digits", "num_clients": 8, "partition": {"name": "dirichlet_per_class", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "dfedavg"},
        "local": {"lr": 0.1, "batch_size": 16, "steps": 3},
        "protocol": {"name": "decentralized"},
        "topology": {"name": "ring"},
        "run": {"rounds": 3, "eval_every": 3, "progress": False, "torch_threads": 1},
    }
    return merge(cfg, sections)


def quad_dec_config(**sections):
    """The federated quadratic (float64, full-batch gradients) on 8 nodes, decentralized."""
    cfg = quadratic_config(data={"num_clients": 8}, strategy={"name": "dfedavg"}, protocol={"name": "decentralized"},
                           run={"rounds": 5, "eval_every": 5})
    return merge(cfg, sections)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def test_dfedsam_with_rho_zero_is_dfedavg_bit_for_bit():
    a = run_config(dec_config(strategy={"name": "dfedsam", "rho": 0.0}))
    b = run_config(dec_config())
    assert torch.equal(a.final_state.models, b.final_state.models)
    assert strip(a.rows) == strip(b.rows)
    c = run_config(dec_config(strategy={"name": "dfedsam", "rho": 0.05}))
    assert not torch.equal(c.final_state.models, b.final_state.models)  # ρ > 0 does change the run


def test_complete_graph_with_uniform_weights_is_a_fedavg_round():
    # every node averages all y_j with weight 1/n; FedAvg with all clients, plain mean, η_g = 1
    dec = run_config(dec_config(topology={"name": "complete", "mixing": "uniform"}, run={"rounds": 1, "eval_every": 1}))
    fl = run_config(dec_config(strategy={"name": "fedavg"}, protocol={"name": "sync", "weighting": "identical"},
                               topology=None, run={"rounds": 1, "eval_every": 1}))
    x_fl = fl.protocol.eval_params(fl.ctx, fl.final_state)
    nodes = dec.final_state.models
    assert torch.allclose(nodes, x_fl.expand_as(nodes), atol=1e-6, rtol=0)
    assert dec.rows[-1]["test_accuracy"] == pytest.approx(fl.rows[-1]["test_accuracy"], abs=1e-9)


def test_many_gossip_steps_on_a_ring_act_like_the_complete_graph():
    # W_ring^Q → 11ᵀ/n: λ^Q = 0.805^300 ≈ 1e-28, so DFedAvg-MGS on the ring runs the complete graph's iterates
    ring = run_config(quad_dec_config(protocol={"gossip_steps": 300}, topology={"name": "ring"}))
    full = run_config(quad_dec_config(topology={"name": "complete", "mixing": "uniform"}))
    assert torch.allclose(ring.final_state.models, full.final_state.models, atol=1e-10, rtol=0)
    one = run_config(quad_dec_config(topology={"name": "ring"}))
    assert (one.final_state.models - full.final_state.models).abs().max() > 1e-3  # Q = 1 is different


def quad(a: float, b: torch.Tensor):
    def grad_fn(y, batch):
        return a * (y - b), 0.5 * a * ((y - b) ** 2).sum()

    return grad_fn


def test_sam_direction_golden():
    # f(y) = ½a‖y − b‖²: g = a(y − b), ε = ρ g/‖g‖, direction = a(y + ε − b)
    a, rho = 2.0, 0.1
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    g = a * (y - b)  # (−2, 6)
    d, loss = sam(rho)(y, None, quad(a, b), 0)
    assert torch.allclose(d, a * (y + rho * g / g.norm() - b), atol=1e-12, rtol=0)  # ε has +1e-12 in ‖g‖
    assert loss.item() == pytest.approx(0.5 * a * 10.0)  # the loss at y, before the perturbation


def test_dfedavgm_local_update_is_heavy_ball():
    # Sun et al.: y^{k+1} = y^k − η∇f(y^k) + θ(y^k − y^{k−1}), y^{−1} = y^0 (momentum restarted each round)
    eta, theta, a = 0.1, 0.9, 1.5
    b = torch.tensor([3.0], dtype=torch.float64)
    grad_fn = quad(a, b)
    z = torch.zeros(4, 1, 1, dtype=torch.float64)
    batches = Batches(z, z[..., 0], torch.ones(4, 1, dtype=torch.float64))
    out = dfedavgm(momentum=theta).local(Payload(torch.zeros(1, dtype=torch.float64)), {}, batches, grad_fn,
                                         LocalHP(lr=eta))
    prev = y = torch.zeros(1, dtype=torch.float64)
    for _ in range(4):
        y, prev = y - eta * grad_fn(y, None)[0] + theta * (y - prev), y
    assert torch.allclose(out.update, y, atol=1e-14, rtol=0)  # gossip messages carry parameters


def test_init_modes():
    shared = run_config(dec_config(run={"rounds": 1})).ctx
    from fedsim.protocols.nodes import initial_models

    s = initial_models(shared, "shared")
    assert torch.equal(s, shared.initial_params.expand_as(s))
    ind = initial_models(shared, "independent")
    assert torch.equal(ind, initial_models(shared, "independent"))  # keyed, reproducible
    assert all(not torch.equal(ind[0], ind[i]) for i in range(1, len(ind)))
    # PyTorch's default init spread, per node: similar variance, different draws
    assert ind.var(dim=1).std() / ind.var(dim=1).mean() < 0.1
    with pytest.raises(ConfigError, match=r"protocol\.init: the model has no layer with reset_parameters"):
        run_config(quad_dec_config(protocol={"init": "independent"}))


def test_strategy_and_protocol_must_match():
    with pytest.raises(ConfigError, match=r"strategy\.name: 'dfedsam' is a gossip \(decentralized\) strategy; "
                                          r"protocol 'sync' needs a server-based strategy"):
        run_config(dec_config(strategy={"name": "dfedsam"}, protocol={"name": "sync"}))
    with pytest.raises(ConfigError, match=r"strategy\.name: 'fedavg' is a server-based strategy; protocol "
                                          r"'decentralized' needs a gossip"):
        run_config(dec_config(strategy={"name": "fedavg"}))
    with pytest.raises(ConfigError, match=r"protocol\.name: strategy 'co2' runs under protocol 'sync', not 'async'"):
        run_config(merge(dec_config(strategy={"name": "co2"}, protocol={"name": "async"}), {"topology": None}))


def test_bytes_and_round_time():
    # ring of 8, Q = 2: each node sends and receives 2 models per gossip step
    cfg = dec_config(protocol={"gossip_steps": 2}, run={"rounds": 2, "eval_every": 1},
                     system={"compute": {"name": "constant", "step_time": 0.01},
                             "link": {"name": "constant", "bandwidth_down": 1e6, "bandwidth_up": 2.5e5, "latency": 0.05}})
    run = run_config(cfg)
    size = run.ctx.task.layout.dim * 4
    per_round = 2 * 8 * 2 * size
    assert [r["bytes_up"] for r in run.rows] == [0, per_round, 2 * per_round]
    assert run.rows[-1]["bytes_down"] == 2 * per_round
    round_time = 3 * 0.01 + 2 * 0.05 + 2 * 2 * size / 1e6 + 2 * 2 * size / 2.5e5
    assert run.rows[-1]["virtual_time"] == pytest.approx(2 * round_time, abs=1e-8)
    assert run.rows[-1]["aggregations"] == 4


def test_inactive_nodes_neither_train_nor_gossip():
    cfg = dec_config(system={"dropout": {"name": "bernoulli", "p": 0.4}}, run={"rounds": 1, "eval_every": 1},
                     topology={"name": "exponential"})
    run = run_config(cfg)
    n = 8
    lost, _ = run.ctx.population.drops(np.arange(n), np.arange(n))  # round 0: job ids 0..7
    assert 0 < lost.sum() < n
    x0 = run.ctx.initial_params
    for i in range(n):
        assert torch.equal(run.final_state.models[i], x0) == bool(lost[i])
    assert run.rows[-1]["active_nodes"] == n - lost.sum()


def test_metrics_row_and_time_varying_topology():
    run = run_config(dec_config(topology={"name": "dynamic_regular", "degree": 3}, protocol={"eval_nodes": 4},
                                local={"steps": 8}, run={"rounds": 6, "eval_every": 3}))
    row = run.rows[-1]
    for key in ("node_acc_mean", "node_acc_std", "node_acc_min", "node_acc_max", "consensus_distance", "spectral_gap"):
        assert row[key] is not None, key
    assert row["node_acc_min"] <= row["node_acc_mean"] <= row["node_acc_max"]
    models = run.final_state.models
    assert row["consensus_distance"] == pytest.approx(float((models - models.mean(0)).norm(dim=1).mean()), rel=1e-6)
    assert torch.equal(run.protocol.eval_params(run.ctx, run.final_state), models.mean(0))
    assert 0 < row["spectral_gap"] < 1 and row["test_accuracy"] > 0.2
    assert len({r["spectral_gap"] for r in run.rows[1:]}) == 2  # a different graph each round


def test_sparse_gossip_path_runs_large_n():
    # above 256 nodes the mixing matrix is a sparse CSR tensor; the run must match its dense twin
    cfg = quad_dec_config(data={"num_clients": 300}, run={"rounds": 1, "eval_every": 1}, local={"steps": 1})
    from fedsim.topologies import mixing

    sparse = run_config(cfg).final_state.models
    old = mixing.DENSE_UP_TO
    mixing.DENSE_UP_TO = 10**6
    try:
        dense = run_config(cfg).final_state.models
    finally:
        mixing.DENSE_UP_TO = old
    assert torch.allclose(sparse, dense, atol=1e-12, rtol=0)
    assert math.isfinite(float(sparse.sum()))


def test_only_available_nodes_train_and_idle_rounds_wait(tmp_path):
    cfg = dec_config(data={"num_clients": 4}, run={"rounds": 6, "eval_every": 6, "log_events": True},
                     system={"compute": {"name": "constant", "step_time": 0.1},
                             "availability": {"name": "bernoulli", "p_on": 0.2, "period": 0.2}})
    run = run_config(cfg, tmp_path)
    trace = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "idle" for e in trace)  # nobody was online at some round start
    trains = [e for e in trace if e["kind"] == "train"]
    assert len(trains) == 6 and run.final_state.rounds == 6
    for e in trains:
        online = run.ctx.population.available(np.arange(4), e["time"])
        assert e["nodes"] == online.tolist()
