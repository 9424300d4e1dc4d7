"""Compressed gossip (CHOCO-Gossip / CHOCO-SGD and its baselines) on the heterogeneous quadratic
over a ring: consensus, optimum, bytes by hand, equality with plain gossip, checkpoint/resume."""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from fedsim.checkpoint import list_checkpoints
from fedsim.cli import main
from fedsim.errors import ConfigError, DivergenceError
from fedsim.outputs import read_jsonl
from fedsim.channel import build_channel
from fedsim.merge import mix
from fedsim.topologies.mixing import as_tensor, metropolis_hastings

from .conftest import merge, quadratic_config, run_config
from .handmade import quadratic

N, D = 8, 20
TOP10 = {"name": "topk", "ratio": 0.1}  # k = 2 of 20 coordinates
W = as_tensor(metropolis_hastings(nx.cycle_graph(N)), torch.float64)  # ring: w_ij = 1/3
A_, B_, OPT = quadratic(N, D)
A, B, X_STAR = torch.tensor(A_)[:, None], torch.tensor(B_), torch.tensor(OPT)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # thousands of tiny steps; conftest restores the default afterwards


def iterate(strategy, steps: int, lr=lambda t: 0.0):
    """Runs `steps` iterations of x ← channel(x − η_t ∇F(x)) from x_i = b_i (η = 0: gossip only);
    returns the node stack and the mean's drift from its start at every step."""
    x, ch = B.clone(), strategy
    state, senders, drift = ch.initial_state(x), np.ones(N, dtype=bool), []
    start = x.mean(0)
    for t in range(steps):
        x = x - lr(t) * A * (x - B)  # full-batch gradient of ½ a_i ‖x − b_i‖²
        x, state, _ = ch.step(x, W, state, senders, t, None, mix)
        drift.append(float((x.mean(0) - start).norm()))
    return x, np.array(drift)


def gossip(feedback: str, gamma: float, comp=TOP10):
    return build_channel("protocol.compression", {"compressor": comp, "feedback": feedback, "gamma": gamma})


def test_choco_gossip_reaches_the_exact_average_while_naive_topk_does_not():
    average = B.mean(0)
    choco, drift = iterate(gossip("ef21", 0.2), 600)
    assert drift.max() < 1e-12  # x̄ is preserved at every step: Σ_i Σ_j w_ij (x̂_j − x̂_i) = 0
    assert float((choco - average).norm(dim=1).max()) < 1e-9  # and every node reaches it
    naive, drift = iterate(gossip("none", 1.0), 600)
    assert drift.max() < 1e-12  # x_i + γ Σ w_ij (Q(x_j) − Q(x_i)) keeps the mean too …
    assert float((naive - average).norm(dim=1).max()) > 1.0  # … but coordinates never sent never mix
    econtrol, _ = iterate(gossip("econtrol", 0.1), 600)  # EControl's sender rule on x̂ (an extension)
    assert float((econtrol - average).norm(dim=1).max()) < 1e-3


def test_choco_needs_a_contractive_compressor():
    # QSGD, 1 bit + sign, buckets of 4: variance bound ω = min(4/1, √4/1) = 2 > 1, so the unbiased
    # quantizer is not contractive and CHOCO's public copies blow up; scaled by 1/(1 + ω) (the
    # CHOCO authors' 'qsgd-biased') it is, and the nodes reach the exact average.
    comp = {"name": "qsgd", "bits": 2, "bucket": 4}
    unbiased, _ = iterate(gossip("ef21", 0.3, comp), 300)
    assert float(unbiased.abs().max()) > 1e10  # from |b_ij| < 12
    scaled, drift = iterate(gossip("ef21", 0.3, {**comp, "contractive": True}), 600)
    assert drift.max() < 1e-12 and float((scaled - B.mean(0)).norm(dim=1).max()) < 1e-9


def test_a_diverging_gossip_step_says_what_to_change():
    ch = gossip("ef21", 0.3)
    x = 1.7e308 * (-1.0) ** torch.arange(N, dtype=torch.float64)[:, None] * torch.ones(N, D, dtype=torch.float64)
    with pytest.raises(DivergenceError, match="lower protocol.compression.gamma"):  # neighbours' differences overflow
        ch.step(x, W, ch.initial_state(x), np.ones(N, dtype=bool), 0, None, mix)
    x[3, 0] = float("inf")  # NaN/inf from local training: the protocol reports it (local.lr), not the channel
    assert not bool(torch.isfinite(ch.step(x, W, ch.initial_state(x), np.ones(N, dtype=bool), 0, None, mix)[0]).all())


def test_choco_sgd_reaches_the_fixed_point_of_uncompressed_dsgd():
    # CHOCO's fixed point has x̂ = x^{t+½} (else Q(x − x̂) ≠ 0), so it is D-SGD's with the lazy
    # mixing matrix W_γ = (1 − γ)I + γW: compression costs nothing at convergence.
    gamma, eta, steps = 0.2, 0.05, 1500
    w_gamma = (1 - gamma) * torch.eye(N, dtype=torch.float64) + gamma * W
    ref = B.clone()
    for _ in range(steps):
        ref = w_gamma @ (ref - eta * A * (ref - B))
    choco, _ = iterate(gossip("ef21", gamma), steps, lambda t: eta)
    assert float((choco - ref).abs().max()) < 1e-10
    naive, _ = iterate(gossip("none", gamma), steps, lambda t: eta)
    assert float((naive - ref).abs().max()) > 1.0


def test_choco_sgd_with_decreasing_steps_approaches_the_optimum_as_fast_as_dsgd():
    gamma, steps, lr = 0.2, 2000, (lambda t: 1.0 / (t + 20))  # η_t ∝ 1/t, as in the paper's theorem
    w_gamma = (1 - gamma) * torch.eye(N, dtype=torch.float64) + gamma * W
    ref = B.clone()
    for t in range(steps):
        ref = w_gamma @ (ref - lr(t) * A * (ref - B))
    exact = float((ref - X_STAR).norm(dim=1).max())
    choco = float((iterate(gossip("ef21", gamma), steps, lr)[0] - X_STAR).norm(dim=1).max())
    naive = float((iterate(gossip("none", gamma), steps, lr)[0] - X_STAR).norm(dim=1).max())
    assert exact < 0.35 and abs(choco - exact) < 0.01 * exact, (choco, exact)  # ‖x_i − x*‖ ~ 1/t, 3-4 from the start
    assert naive > 3.0, naive


def ring_config(compression=None, strategy="dfedavg", gossip_steps=1, **sections):
    protocol = {"name": "decentralized", "gossip_steps": gossip_steps, "compression": compression}
    cfg = quadratic_config(data={"num_clients": N, "dim": D}, strategy=strategy, protocol=protocol,
                           topology={"name": "ring"}, local={"steps": 1}, run={"rounds": 4, "eval_every": 2})
    return merge(cfg, sections)


def test_bytes_and_round_time_count_the_encoded_messages():
    # Top-2 of d = 20 float64: 2·(⌈log₂ 20⌉ + 64) = 138 bits → 18 bytes per message. Ring of 8,
    # Q = 2 steps: 8 nodes × 2 neighbours × 2 steps × 18 = 576 bytes up (and down) per round.
    link = {"name": "constant", "bandwidth_down": 1e3, "bandwidth_up": 500.0, "latency": 0.05}
    comp = {"compressor": TOP10, "gamma": 0.2}
    run = run_config(ring_config(comp, gossip_steps=2,
                                 system={"compute": {"name": "constant", "step_time": 0.01}, "link": link}))
    assert [r["bytes_up"] for r in run.rows] == [0, 2 * 576, 4 * 576]
    assert run.rows[-1]["bytes_down"] == 4 * 576
    per_node = 2 * 2 * 18  # each node sends (and receives) 2 messages per step
    round_time = 0.01 + 2 * 0.05 + per_node / 1e3 + per_node / 500.0
    assert run.rows[-1]["virtual_time"] == pytest.approx(4 * round_time, abs=1e-8)
    qsgd = run_config(ring_config({**comp, "compressor": {"name": "qsgd", "bits": 4, "bucket": 8}}, gossip_steps=2))
    # QSGD 4-bit, buckets of 8: 80 bits → 10 bytes + 3 float64 norms = 34 bytes per message
    assert qsgd.rows[-1]["bytes_up"] == 4 * 8 * 2 * 2 * 34


def test_offline_nodes_send_nothing_and_keep_their_public_copy():
    cfg = ring_config({"compressor": TOP10, "gamma": 0.2},
                      system={"dropout": {"name": "bernoulli", "p": 0.4}}, run={"rounds": 1, "eval_every": 1})
    run = run_config(cfg)
    lost, _ = run.ctx.population.drops(np.arange(N), np.arange(N))  # round 0: job ids 0..7
    assert 0 < lost.sum() < N
    links = sum(int(not lost[i] and not lost[(i + 1) % N]) for i in range(N))  # ring edges between active nodes
    assert run.rows[-1]["bytes_up"] == run.rows[-1]["bytes_down"] == 2 * links * 18
    senders = [i for i in range(N) if not lost[i] and (not lost[i - 1] or not lost[(i + 1) % N])]
    for i in range(N):  # x̂⁰ = 0 is kept (and changes) only where a message went out
        kept = run.ctx.memory.get(i)
        assert (kept is not None and bool(kept["feedback.h"].any())) == (i in senders)


@pytest.mark.parametrize("inner,q", [("dfedavg", 1), ("dfedsam", 2), ({"name": "gossip", "variance_correction": True}, 1)])
def test_identity_compressor_with_gamma_one_is_the_inner_gossip(inner, q):
    plain = run_config(ring_config(None, inner, q))
    wrapped = run_config(ring_config({"compressor": "identity", "gamma": 1.0}, inner, q))
    assert torch.allclose(plain.final_state.models, wrapped.final_state.models, atol=1e-12, rtol=0)
    assert plain.rows[-1]["bytes_up"] == wrapped.rows[-1]["bytes_up"]
    assert plain.rows[-1]["bytes_down"] == wrapped.rows[-1]["bytes_down"]


def test_resume_restores_the_public_copies(tmp_path):
    comp = {"compressor": {"name": "qsgd", "bits": 2, "bucket": 4}, "gamma": 0.2}
    cfg = ring_config(comp, run={"rounds": 6, "eval_every": 1, "checkpoint_every": 1, "keep_checkpoints": 4})
    run_config(cfg, tmp_path / "ref")
    out = tmp_path / "run"
    run_config(cfg, out)
    for path in list_checkpoints(out)[-2:]:  # as if killed after round 4
        path.unlink()
    assert main(["resume", str(out), "--quiet"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert torch.equal(torch.load(out / "final_model.pt"), torch.load(tmp_path / "ref" / "final_model.pt"))


@pytest.mark.parametrize("cfg, path, match", [
    (ring_config({"compressor": TOP10}), "protocol.compression.gamma", "gamma"),
    (ring_config({"compressor": TOP10, "gamma": 1.5}), "protocol.compression.gamma", "1"),
    (ring_config({"compressor": "nope", "gamma": 0.5}), "protocol.compression.compressor.name", "topk"),
    (ring_config({"compressor": TOP10, "gamma": 0.5, "feedbak": "ef"}), "protocol.compression.feedbak", "feedback"),
    (ring_config({"gamma": 0.5}, topology={"name": "random_matching"}), "topology.name", "static graph"),
])
def test_bad_compressed_gossip_configs_name_the_key(cfg, path, match):
    with pytest.raises(ConfigError, match=match) as info:
        run_config(cfg)
    assert info.value.path == path


def test_naive_rules_run_on_time_varying_graphs():
    run = run_config(ring_config({"compressor": TOP10, "feedback": "ef", "gamma": 0.2}, topology={"name": "random_matching"}))
    assert sum(float(run.ctx.memory.get(i)["feedback.e"].abs().sum()) for i in range(N)) > 0  # DeepSqueeze's error memory


ON_GPU = {"kind": "vmap", "device": "cuda", "keep_on_device": True, "on_unsupported": "error"}


@pytest.mark.cuda
@pytest.mark.parametrize("comp", [{"name": "topk", "ratio": 0.05}, {"name": "randk", "ratio": 0.05},
                                  {"name": "qsgd", "bits": 4, "bucket": 64}, "sign"])
def test_cuda_node_stack_on_the_gpu_equals_serial(comp):
    from .test_decentralized import dec_config

    cfg = dec_config(protocol={"compression": {"compressor": comp, "gamma": 0.1}})
    cpu = run_config(cfg)
    gpu = run_config({**cfg, "executor": ON_GPU})
    assert torch.allclose(gpu.final_state.models.cpu(), cpu.final_state.models, atol=1e-4, rtol=0)
    assert gpu.rows[-1]["bytes_up"] == cpu.rows[-1]["bytes_up"]


@pytest.mark.cuda
def test_cuda_time_varying_graph_with_memory_kept_on_the_gpu_equals_serial():
    # on a random matching some nodes send and some do not each round: the round's channel
    # state stacks stored rows (CPU) with fresh ones made from the node stack on the GPU
    cfg = ring_config({"compressor": TOP10, "feedback": "ef", "gamma": 0.2}, topology={"name": "random_matching"})
    cpu = run_config(cfg)
    gpu = run_config({**cfg, "executor": ON_GPU})
    assert torch.allclose(gpu.final_state.models.cpu(), cpu.final_state.models, atol=1e-6, rtol=0)


def async_ring_config(compression, rule="own_job"):
    return quadratic_config(data={"num_clients": N, "dim": D}, strategy={"name": "dfedavg"}, topology={"name": "ring"},
                            protocol={"name": "async_gossip", "init": "shared", "compression": compression,
                                      "rule": rule},
                            local={"lr": 0.02, "batch_size": 1, "steps": 1}, run={"rounds": 60, "eval_every": 60})


@pytest.mark.cuda
def test_cuda_async_gossip_channel_memory_meets_models_on_the_gpu():
    # a node's channel memory comes back from the CPU store; its model lives on the GPU
    cfg = async_ring_config({"compressor": TOP10, "gamma": 0.2})
    cpu = run_config(cfg)
    gpu = run_config({**cfg, "executor": ON_GPU})
    assert torch.allclose(gpu.final_state.models.cpu(), cpu.final_state.models, atol=1e-6, rtol=0)


def assert_same_run(a: dict, b: dict) -> None:
    """Two runs' rows agree: counts exactly, measurements to float64 rounding (an exact
    channel's consensus step x + γ·(mixed − x) with γ = 1 gives plain gossip's `mixed` only
    up to rounding)."""
    assert a.keys() == b.keys()
    for k in a.keys() - {"wall_time"}:
        if isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-15), k
        else:
            assert b[k] == a[k], k


def test_compressed_asynchronous_gossip():
    dense = run_config(async_ring_config(None)).rows[-1]
    same = run_config(async_ring_config({"compressor": "identity", "feedback": "none", "gamma": 1.0})).rows[-1]
    assert_same_run(dense, same)  # an exact channel with γ = 1 is plain gossip
    choco = run_config(async_ring_config({"compressor": TOP10, "gamma": 0.3}))
    naive = run_config(async_ring_config({"compressor": TOP10, "feedback": "none", "gamma": 0.3})).rows[-1]
    # 480 jobs, each pushed to 2 neighbours as one Top-2 message of 18 bytes
    assert choco.rows[-1]["bytes_up"] == 480 * 2 * 18 == naive["bytes_up"]
    assert 480 * 2 * 18 - 4 * 18 <= choco.rows[-1]["bytes_down"] <= 480 * 2 * 18  # the last pushes may be in transit
    assert dense["consensus_distance"] < choco.rows[-1]["consensus_distance"] < 0.6 * naive["consensus_distance"]
    assert choco.rows[-1]["dist_to_opt"] < 0.6 * naive["dist_to_opt"]
    assert all(bool(choco.ctx.memory.get(i)["feedback.h"].any()) for i in range(N))  # every public copy moved


def test_an_exact_channel_is_plain_gossip_under_the_dfl2_rule():
    # a 'dfl2' merge is an event of its own, after the node's push: its own view there is its model
    dense = run_config(async_ring_config(None, "dfl2")).rows[-1]
    same = run_config(async_ring_config({"compressor": "identity", "feedback": "none", "gamma": 1.0}, "dfl2")).rows[-1]
    assert_same_run(dense, same)
    assert dense != {**run_config(async_ring_config(None)).rows[-1], "wall_time": dense["wall_time"]}  # the rules part


@pytest.mark.parametrize("comp,feedback", [(TOP10, "ef21"), (TOP10, "ef"), ("sign", "none"), ("identity", "econtrol"),
                                           ({"name": "qsgd", "bits": 3, "contractive": True}, "ef21"),
                                           ({"name": "randk", "ratio": 0.1}, "ef")])
def test_many_senders_make_their_messages_together_as_one_by_one(comp, feedback, monkeypatch):
    # from SEND_TOGETHER_FROM senders a step makes every message in one vectorised call, each
    # row drawing from its node's own key (qsgd, randk); the same models, states and sizes, bit for bit
    import fedsim.channel as channel_module

    n = 40
    w = as_tensor(metropolis_hastings(nx.random_regular_graph(4, n, seed=1)), torch.float64)
    senders = np.ones(n, dtype=bool)
    senders[[3, 17]] = False  # two nodes without out-links this step

    def run():
        ch = gossip(feedback, 0.2, comp)
        x = torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        state = ch.initial_state(x)
        for t in range(3):
            x, state, sizes = ch.step(x, w, state, senders, t, None, mix)
        return x, state, sizes

    calls = []
    real = channel_module.Channel._send_together
    monkeypatch.setattr(channel_module.Channel, "_send_together", lambda *a: calls.append(real(*a)) or calls[-1])
    together = run()
    assert len(calls) == 3 and all(c is not None for c in calls)  # made together, not refused
    monkeypatch.setattr(channel_module, "SEND_TOGETHER_FROM", n + 1)
    alone = run()
    assert len(calls) == 3  # the reference made its messages one by one
    assert torch.equal(together[0], alone[0]) and np.array_equal(together[2], alone[2])
    assert together[1].keys() == alone[1].keys() and all(torch.equal(together[1][k], alone[1][k]) for k in alone[1])
    assert together[2][3] == 0 and together[2][0] > 0
