"""Compressors, error feedback and the `compressed` wrapper: byte counts by hand, stall vs
convergence on heterogeneous least squares, equivalences, determinism, config errors."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from fedsim.comm import nbytes
from fedsim.compressors import decode, identity, qsgd, randk, random_indices, sign, topk
from fedsim.errors import ConfigError
from fedsim.strategy import ClientOutput, LocalHP
from fedsim.strategies.compressed import compressed

from .conftest import quadratic_config, run_config
from .handmade import one_round, quad_grad, quadratic

V = torch.tensor([0.5, -3.0, 0.0, 2.0, -0.25, 1.0, -1.5, 0.75], dtype=torch.float64)


def test_topk_keeps_the_largest_magnitudes():
    msg = topk(ratio=0.25)(V, 0)  # k = 2 of 8
    assert msg.indices.tolist() == [1, 3]
    assert decode(msg).tolist() == [0, -3.0, 0, 2.0, 0, 0, 0, 0]


def test_randk_receiver_regenerates_the_indices_from_the_key():
    msg = randk(ratio=0.5)(V, 1234)
    idx = random_indices(1234, 8, 4)
    dense = torch.zeros(8, dtype=torch.float64)
    dense[idx] = V[idx]
    assert torch.equal(decode(msg), dense)
    assert torch.equal(decode(randk(ratio=0.5)(V, 1234)), dense)  # same key, same message
    assert not torch.equal(random_indices(1235, 8, 4), idx) or not torch.equal(random_indices(1236, 8, 4), idx)


def test_randk_unbiased_and_qsgd_are_unbiased_in_expectation():
    n = 2000
    for comp in (randk(ratio=0.25, unbiased=True), qsgd(bits=3, bucket=4)):
        draws = torch.stack([decode(comp(V, key)) for key in range(n)])
        z = (draws.mean(0) - V) / (draws.std(0) / n**0.5).clamp_min(1e-12)  # a z-test per coordinate
        assert bool((z.abs() < 4).all()), z


def test_contractive_qsgd_is_the_unbiased_one_scaled_by_one_over_one_plus_omega():
    plain, scaled = qsgd(bits=2, bucket=4), qsgd(bits=2, bucket=4, contractive=True)
    omega = min(4 / 1**2, 4**0.5 / 1)  # s = 1 level, buckets of 4: ω = 2
    assert torch.equal(decode(scaled(V, 3)), decode(plain(V, 3)) / (1 + omega))
    assert scaled(V, 3).nbytes == plain(V, 3).nbytes  # the scale is configuration, not sent
    err = torch.stack([(decode(scaled(V, key)) - V).pow(2).sum() for key in range(2000)]).mean()
    assert float(err) <= (1 - 1 / (1 + omega)) * float(V.pow(2).sum())  # contractive: δ = 1/(1 + ω)


def test_scaled_sign():
    msg = sign()(V, 0)
    scale = V.abs().mean()
    assert torch.equal(decode(msg), scale * torch.tensor([1, -1, 1, 1, -1, 1, -1, 1], dtype=torch.float64))


def test_qsgd_levels_and_error_bound():
    comp = qsgd(bits=4, bucket=3)  # s = 7 levels; buckets [0:3], [3:6], [6:8]
    msg = comp(V, 7)
    assert msg.levels_max == 7 and int(msg.levels.min()) >= 0 and int(msg.levels.max()) <= 7
    norms = torch.stack([V[0:3].norm(), V[3:6].norm(), V[6:8].norm()])
    assert torch.allclose(msg.norms, norms)
    per_coord = norms.repeat_interleave(3)[:8] / 7  # stochastic rounding moves a coordinate by < one level
    assert bool(((decode(msg) - V).abs() < per_coord + 1e-12).all())


def test_compressed_sizes_match_a_hand_computation():
    d64 = torch.linspace(-1, 1, 20, dtype=torch.float64)
    # Top-k: k = 2, indices ⌈log₂ 20⌉ = 5 bits, values 64 bits → 2·69 = 138 bits → 18 bytes.
    assert topk(ratio=0.1)(d64, 0).nbytes == 18
    # Rand-k: 2 values · 8 bytes + the 8-byte key.
    assert randk(ratio=0.1)(d64, 0).nbytes == 24
    # Sign: 20 bits → 3 bytes, plus one float64 scale.
    assert sign()(d64, 0).nbytes == 11
    # QSGD 4-bit, buckets of 8: 80 bits → 10 bytes, plus 3 float64 norms.
    assert qsgd(bits=4, bucket=8)(d64, 0).nbytes == 34
    # A float32 MLP-sized vector (d = 4810): Top-1% → k = 48, 48·(13 + 32) bits = 270 bytes
    # (dense: 19,240 bytes); QSGD 4-bit with buckets of 512: 2,405 + 10·4 bytes.
    d32 = torch.randn(4810, generator=torch.Generator().manual_seed(0))
    assert topk(ratio=0.01)(d32, 0).nbytes == 270
    assert qsgd(bits=4, bucket=512)(d32, 0).nbytes == 2445
    assert nbytes(identity()(d32, 0)) == 19240
    # the engine's byte counter counts an encoded uplink by its encoded size
    out = ClientOutput(topk(ratio=0.01)(d32, 0), {}, {"a": torch.zeros((), dtype=torch.float32)}, {})
    assert nbytes(out) == 270 + 4


def test_bytes_up_of_a_compressed_run_is_the_encoded_size():
    rounds, clients = 4, 10
    cfg = quadratic_config(
        data={"dim": 20},
        strategy={"name": "compressed", "inner": "fedavg", "compressor": {"name": "topk", "ratio": 0.1}, "feedback": "ef21"},
        run={"rounds": rounds, "eval_every": rounds},
    )
    run = run_config(cfg)
    assert run.rows[-1]["bytes_up"] == rounds * clients * 18  # 18 bytes per message, as above
    assert run.rows[-1]["bytes_down"] == rounds * clients * 20 * 8  # the model still travels dense


# --- heterogeneous least squares: compressed gradient descent (one local step per round) ---

def run_rounds(s, rounds, a, b, lr=0.1, memory=None):
    """Full participation, equal weights, one local step: x ← x − γ·mean(received vectors)."""
    n, d = b.shape
    state = s.init(torch.zeros(d, dtype=torch.float64))
    client = [s.client_state(torch.zeros(d, dtype=torch.float64)) if s.client_state else {} for _ in range(n)]
    clients = [(quad_grad(float(a[i]), b[i]), 1) for i in range(n)]
    memory = {} if memory is None else memory  # the server's memory of each client, kept across rounds
    for r in range(rounds):
        state = one_round(s, state, clients, [1.0 / n] * n, LocalHP(lr=lr), client, r, memory)
    return state, client


def wrapper(feedback, eta=0.1, comp=None):
    return compressed(inner="fedavg", compressor=comp or {"name": "topk", "ratio": 0.1}, feedback=feedback, eta=eta)


def test_topk_stalls_without_feedback_while_ef21_and_econtrol_reach_the_optimum():
    # (docs/algorithms.md, compression): 10 clients, d = 20, Top-2 of each client's gradient step.
    a, b, opt = quadratic(10, 20)
    dist = {}
    for rule in ("none", "ef21", "econtrol"):
        s = wrapper(rule)
        state, _ = run_rounds(s, 300, a, b)
        dist[rule] = float(np.linalg.norm(s.params(state).numpy() - opt))
    assert dist["none"] > 1.0, dist  # stalls far from x*
    assert dist["ef21"] < 1e-8 and dist["econtrol"] < 1e-6, dist


def test_econtrol_with_eta_zero_is_ef21_and_server_estimates_mirror_the_clients():
    a, b, _ = quadratic(4, 6, seed=1)
    memory: dict = {}
    ef21, ef21_clients = run_rounds(wrapper("ef21", comp={"name": "topk", "ratio": 0.34}), 20, a, b, memory=memory)
    ec0, _ = run_rounds(wrapper("econtrol", eta=0.0, comp={"name": "topk", "ratio": 0.34}), 20, a, b)
    assert torch.equal(ef21.params, ec0.params)
    for i, st in enumerate(ef21_clients):  # the server's copy of h_i (its memory of client i) is the client's h_i
        assert torch.equal(memory[i]["h"], st["feedback.h"])


def test_identity_compression_changes_nothing():
    cfg = {"run": {"rounds": 6, "eval_every": 6}}
    plain = run_config(quadratic_config(strategy={"name": "fedprox", "mu": 0.1}, **cfg))
    wrapped = run_config(quadratic_config(strategy={"name": "compressed", "inner": {"name": "fedprox", "mu": 0.1},
                                                    "compressor": "identity"}, **cfg))
    assert torch.equal(plain.protocol.eval_params(plain.ctx, plain.final_state),
                       wrapped.protocol.eval_params(wrapped.ctx, wrapped.final_state))
    assert plain.rows[-1]["bytes_up"] == wrapped.rows[-1]["bytes_up"]


def test_stochastic_compressors_are_keyed_by_seed_and_job():
    strat = {"name": "compressed", "compressor": {"name": "qsgd", "bits": 2, "bucket": 4}, "feedback": "ef"}
    finals = []
    for seed in (0, 0, 1):
        run = run_config(quadratic_config(strategy=strat, seed=seed, run={"rounds": 3, "eval_every": 3}))
        finals.append(run.protocol.eval_params(run.ctx, run.final_state))
    assert torch.equal(finals[0], finals[1])
    assert not torch.allclose(finals[0], finals[2])


@pytest.mark.parametrize("strategy, path", [
    ({"name": "compressed", "compressor": {"name": "topk", "ratio": 1.5}}, "strategy.compressor.ratio"),
    ({"name": "compressed", "compressor": "zip"}, "strategy.compressor.name"),
    ({"name": "compressed", "inner": {"name": "fedavg", "server_lr": -1}}, "strategy.inner.server_lr"),
    ({"name": "compressed", "feedback": "ef22"}, "strategy.feedback"),
])
def test_bad_compression_config_names_the_key(strategy, path):
    with pytest.raises(ConfigError) as info:
        run_config(quadratic_config(strategy=strategy, run={"rounds": 1}))
    assert info.value.path == path


def test_index_bits_are_ceil_log2():
    from fedsim.compressors import index_bits

    assert [index_bits(d) for d in (2, 3, 4, 5, 1024, 1025)] == [1, 2, 2, 3, 10, 11]
    assert index_bits(4810) == math.ceil(math.log2(4810)) == 13


def test_a_diverging_compressed_run_stops_with_a_divergence_error():
    from fedsim.errors import DivergenceError

    strat = {"name": "compressed", "compressor": {"name": "topk", "ratio": 0.5}, "feedback": "ef21"}
    with pytest.raises(DivergenceError, match=r"client \d+'s update has NaN/inf"):  # checked once decoded
        run_config(quadratic_config(strategy=strat, local={"lr": 20.0}, run={"rounds": 60, "eval_every": 60}))


def _async_fedbuff(strategy: dict) -> dict:
    return quadratic_config(
        strategy=strategy,
        protocol={"name": "async", "concurrency": 6, "buffer_size": 2, "max_staleness": 1},
        system={"compute": {"name": "lognormal", "mean": 1.0, "sigma": 1.0}},
        run={"rounds": 40, "eval_every": 40},
    )


@pytest.mark.parametrize("rule", ["ef", "ef21"])
def test_feedback_state_under_an_asynchronous_buffer_with_discarded_stale_updates(rule):
    # FedBuff (buffer 2 of 6 in flight, immediate redispatch) with staleness cuts: a client
    # redispatched before its buffered update is aggregated continues from that update's
    # state, and a discarded update changes neither side — so EF21's server copy of h_i stays
    # the client's h_i (before the fix, a redispatched client restarted from its stored state)
    run = run_config(_async_fedbuff({"name": "compressed", "compressor": {"name": "topk", "ratio": 0.4},
                                     "feedback": rule}))
    store, memory = run.ctx.store, run.ctx.memory
    reported = [c for c in range(10) if store.get(c) is not None]
    assert len(reported) >= 5
    assert run.final_state.discarded > 0  # some stale updates were thrown away
    for c in reported:
        state = store.get(c)
        if rule == "ef21":  # the server's h_i (its memory of client i) is exactly the client's h_i
            assert torch.equal(memory.get(c)["h"], state["feedback.h"])
        else:  # EF keeps a residual per client, bounded by what top-k dropped
            assert torch.isfinite(state["feedback.e"]).all() and len(memory) == 0


def test_identity_compression_under_an_asynchronous_buffer_is_the_inner_strategy():
    def final(strategy):
        run = run_config(_async_fedbuff(strategy))
        return run.protocol.eval_params(run.ctx, run.final_state)

    plain = final({"name": "fedavg"})
    assert torch.equal(final({"name": "compressed", "compressor": "identity"}), plain)
    # EF21 with an exact compressor sends g − h and the server adds it back to h: g up to rounding
    torch.testing.assert_close(final({"name": "compressed", "compressor": "identity", "feedback": "ef21"}), plain,
                               rtol=1e-10, atol=1e-10)


def _vmap_against_serial(comp, rule: str, protocol: dict, on_unsupported: str, **executor):
    cfg = quadratic_config(data={"num_clients": 6, "dim": 12}, protocol=protocol,
                           strategy={"name": "compressed", "compressor": comp, "feedback": rule},
                           local={"lr": 0.05, "batch_size": 2, "steps": 3}, run={"rounds": 4, "eval_every": 2})
    serial = run_config(cfg)
    with pytest.warns(RuntimeWarning) if on_unsupported == "fallback" else contextlib.nullcontext():
        vm = run_config({**cfg, "executor": {"kind": "vmap", "device": "cpu", "graphs": True,
                                             "on_unsupported": on_unsupported, **executor}})
    got = [r.protocol.eval_params(r.ctx, r.final_state) for r in (serial, vm)]
    torch.testing.assert_close(got[1].cpu(), got[0], rtol=1e-6, atol=1e-9)
    assert [r["bytes_up"] for r in vm.rows] == [r["bytes_up"] for r in serial.rows]
    return vm


@pytest.mark.parametrize("protocol", [{"name": "sync", "clients_per_round": 4},
                                      {"name": "async", "buffer_size": 2, "concurrency": 4}])
@pytest.mark.parametrize("comp", [{"name": "topk", "ratio": 0.25}, "sign"])
@pytest.mark.parametrize("rule", ["none", "ef", "ef21", "econtrol"])
def test_deterministic_compressors_run_vectorised_and_equal_serial(comp, rule, protocol):
    # a cohort's messages come back as one message per client, each field stacked by vmap
    # (graphs: the static-buffer path, whose outputs are cloned before the next call)
    vm = _vmap_against_serial(comp, rule, protocol, on_unsupported="error")
    assert vm.ctx.executor.unsupported is None


@pytest.mark.parametrize("protocol", [{"name": "sync", "clients_per_round": 4},
                                      {"name": "async", "buffer_size": 2, "concurrency": 4}])
@pytest.mark.parametrize("comp", [{"name": "randk", "ratio": 0.25}, {"name": "qsgd", "bits": 3, "bucket": 4}])
@pytest.mark.parametrize("rule", ["none", "ef21"])
def test_keyed_random_compressors_run_vectorised_with_each_job_s_own_draws(comp, rule, protocol):
    # the executor gives each row its job's seed, and the hashed draws of row i equal those
    # its job makes alone: the same messages as the serial executor's, in one vectorised call
    vm = _vmap_against_serial(comp, rule, protocol, on_unsupported="error")
    assert vm.ctx.executor.unsupported is None and vm.ctx.executor.row_seeds


@pytest.mark.cuda
@pytest.mark.parametrize("comp", [{"name": "randk", "ratio": 0.25}, {"name": "qsgd", "bits": 3, "bucket": 4}])
def test_keyed_random_compressors_on_the_gpu_draw_what_the_serial_executor_draws(comp):
    # the job seeds go to the GPU with the cohort, and the hashed draws are made there (graphs on)
    _vmap_against_serial(comp, "ef21", {"name": "sync", "clients_per_round": 4}, on_unsupported="error",
                         device="cuda", keep_on_device=True)


def test_only_local_updates_that_ask_for_job_keys_get_row_seeds():
    vm = _vmap_against_serial({"name": "topk", "ratio": 0.25}, "none", {"name": "sync", "clients_per_round": 4},
                              on_unsupported="error")
    assert vm.ctx.executor.row_seeds  # the compressed strategy asks job_key() for every compressor
    cfg = quadratic_config(data={"num_clients": 6, "dim": 12}, run={"rounds": 2, "eval_every": 2},
                           executor={"kind": "vmap", "device": "cpu", "on_unsupported": "error"})
    assert not run_config(cfg).ctx.executor.row_seeds  # fedavg never does: no seeds are computed


def test_a_cohort_s_messages_are_cloned_out_of_reused_buffers():
    from fedsim.compressors import Sparse
    from fedsim.executors.graphs import clone_tree

    msg = Sparse(torch.tensor([[0, 2], [1, 3]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 4)
    out = clone_tree((msg, {"c": torch.ones(2)}))
    assert isinstance(out[0], Sparse) and out[0].dim == 4 and torch.equal(out[0].values, msg.values)
    assert out[0].values.data_ptr() != msg.values.data_ptr() and out[0].indices.data_ptr() != msg.indices.data_ptr()


def test_messages_decode_together_as_one_by_one():
    from fedsim.compressors import decode_many

    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(37, generator=g, dtype=torch.float64) for _ in range(6)]
    for comp in (topk(0.2), sign(), qsgd(3, 8), randk(0.3), identity()):
        msgs = [comp(v, 100 + i) for i, v in enumerate(vs)]  # randk: a key per message, so one by one
        assert torch.equal(decode_many(msgs), torch.stack([decode(m) for m in msgs]))
    mixed = [topk(0.2)(vs[0], 0), sign()(vs[1], 0), topk(0.5)(vs[2], 0)]  # kinds and sizes differ
    assert torch.equal(decode_many(mixed), torch.stack([decode(m) for m in mixed]))


def test_a_sender_with_several_messages_in_one_batch_builds_each_on_the_one_before():
    from fedsim import feedback as fb

    deltas = torch.arange(10.0).reshape(5, 2)
    estimates = torch.tensor([[100.0, 100.0], [200.0, 200.0], [100.0, 100.0], [300.0, 300.0], [100.0, 100.0]])
    senders = [1, 2, 1, 3, 1]  # sender 1's known h is 100 in each of its rows
    got = fb.receive("ef21", deltas, estimates, senders)
    h, want = {}, []
    for i, s in enumerate(senders):  # the receiver's rule message by message
        h[s] = h.get(s, estimates[i]) + deltas[i]
        want.append(h[s])
    assert torch.equal(got, torch.stack(want))
    assert torch.equal(fb.receive("ef", deltas, None, senders), deltas)


def keyed_mask(p: float = 0.5):
    """A plugin-style compressor that draws from its key and returns a dense tensor."""
    from fedsim.rng import torch_generator

    def compress(v, key):
        keep = torch.rand(v.shape, generator=torch_generator(key, "mask"), dtype=v.dtype) < p
        return v * keep.to(v.device)

    return compress


def test_a_vectorised_call_gives_compressors_no_key_to_share():
    # a compressor that seeds a torch.Generator from its key cannot take a row of a batched
    # key: the executor runs such jobs one by one, with the serial executor's draws
    # (randomness: different lets random ops through vmap)
    vm = _vmap_against_serial({"name": "tests.test_compression:keyed_mask"}, "ef21", {"name": "sync", "clients_per_round": 4},
                              on_unsupported="fallback", randomness="different")
    assert vm.ctx.executor.unsupported is not None


def _hashed_draws(device: str) -> list[torch.Tensor]:
    from fedsim.rng import hashed_subset, hashed_uniform

    keys = torch.tensor([0, 7, 2**40 + 3, 2**62 + 11], dtype=torch.int64, device=device)
    alone = [torch.stack([hashed_subset(int(k), "randk", 1000, 37, device) for k in keys]),
             torch.stack([hashed_uniform(int(k), "qsgd", 1000, torch.float64, device) for k in keys])]
    mapped = [torch.func.vmap(lambda k: hashed_subset(k, "randk", 1000, 37, device))(keys),
              torch.func.vmap(lambda k: hashed_uniform(k, "qsgd", 1000, torch.float64, device))(keys)]
    for a, m in zip(alone, mapped):  # a Python int key and a row of a batched key draw the same
        assert torch.equal(a, m)
    return alone


def test_hashed_draws_are_distinct_sorted_subsets_and_uniforms_alone_and_inside_vmap():
    subsets, uniforms = _hashed_draws("cpu")
    assert all(len(set(row.tolist())) == 37 and torch.equal(row, row.sort().values) for row in subsets)
    assert int(subsets.min()) >= 0 and int(subsets.max()) < 1000
    assert not torch.equal(subsets[0], subsets[1])
    assert float(uniforms.min()) >= 0.0 and float(uniforms.max()) < 1.0
    assert abs(float(uniforms.mean()) - 0.5) < 0.03  # 4,000 draws: 5σ ≈ 0.023
    from fedsim.rng import hashed_subset

    with pytest.raises(ValueError, match="2\\^31"):  # the position shares an int64 with the hash
        hashed_subset(1, "randk", 2**31, 1, "meta")


@pytest.mark.cuda
def test_hashed_draws_on_cuda_equal_the_cpu_ones():
    for cpu, gpu in zip(_hashed_draws("cpu"), _hashed_draws("cuda")):
        assert torch.equal(cpu, gpu.cpu())
