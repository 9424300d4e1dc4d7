"""The Ray executor gives the serial executor's results: any number of actors, two nodes,
an actor killed mid-run; user errors name the client and keep the original traceback; a
lost node or a SIGTERM ends a run blocked on Ray at once, with one line and a checkpoint.

One two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU per node) is started for the
module on 127.0.0.1 only and stopped after it, also on failure. Runs inside this process
attach to it; runs through the CLI attach by `ray.address`. Every run sets
run.torch_threads=1: results are bitwise identical only between processes that use the same
number of torch threads (a matmul's reduction order depends on it), see docs/ray.md.
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from fedsim import checkpoint as ckpt
from fedsim.errors import ClientJobError
from fedsim.runner import resume

from .conftest import ROOT, digits_config, exposed_sockets, fedsim_cmd, loopback_ray_cluster, merge, run_config
from .test_decentralized import dec_config
from .test_determinism import strip

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray cluster and actor processes on 2 shared cores: ~20 s a test

FAULTS = "tests.ray_faults"
# One small config per protocol: adding a protocol to the equality test is one line here.
CONFIGS = {
    "sync": digits_config(run={"rounds": 4, "eval_every": 2, "torch_threads": 1},
                          system={"dropout": {"name": "bernoulli", "p": 0.2}}),
    "async": {**digits_config(run={"rounds": 6, "eval_every": 2, "torch_threads": 1}),
              "protocol": {"name": "async", "concurrency": 4, "buffer_size": 2}},
    "decentralized": dec_config(run={"rounds": 2, "eval_every": 1}),  # payloads are views of the node stack
}


def on_ray(cfg, **executor):
    return merge(cfg, {"executor": {"kind": "ray", "num_cpus": 1, **executor}})


@pytest.fixture(scope="module")
def cluster():
    with loopback_ray_cluster(num_cpus=1) as c:  # the nodes, their workers and the CLI runs started here: 127.0.0.1 only
        try:
            c.add_node(num_cpus=1)
            c.wait_for_nodes()
            with warnings.catch_warnings():  # Ray's notice about a future accelerator-env default
                warnings.simplefilter("ignore", FutureWarning)
                ray.init(address=c.address, logging_level=logging.WARNING)
            yield c
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def serial_rows():
    return {name: strip(run_config(cfg).rows) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("num_actors", [1, 2])
@pytest.mark.parametrize("protocol", sorted(CONFIGS))
def test_same_metrics_as_serial(cluster, serial_rows, protocol, num_actors):
    run = run_config(on_ray(CONFIGS[protocol], num_actors=num_actors))
    assert strip(run.rows) == serial_rows[protocol]
    if protocol == "sync":  # one model version per round, put once for all of the round's jobs
        assert run.ctx.executor.models_put == run.final_state.rounds < run.final_state.next_job
    placement = run.ctx.executor.placement
    assert len({a["node"] for a in placement}) == num_actors  # one CPU per node: two actors use both nodes
    assert {a["fedsim"] for a in placement} == {str(ROOT / "fedsim")}  # this checkout's code, not an installed one


def test_dp_over_robust_aggregation_with_label_flipping_clients_matches_serial(cluster):
    """Poisoned labels reach the actors, and clipping, keyed noise and the robust reducer give the serial run."""
    cfg = digits_config(run={"rounds": 3, "eval_every": 3, "torch_threads": 1},
                        system={"adversary": {"name": "label_flip", "fraction": 0.25}},
                        strategy={"name": "dp", "clip": 1.0, "noise_multiplier": 0.3, "adaptive_quantile": 0.5,
                                  "count_noise": 1.0, "inner": {"name": "robust", "reducer": {"name": "krum", "f": 1}}})
    serial = run_config(cfg)
    ray_run = run_config(on_ray(cfg, num_actors=2))
    assert strip(ray_run.rows) == strip(serial.rows)
    assert torch.equal(ray_run.protocol.eval_params(ray_run.ctx, ray_run.final_state),
                       serial.protocol.eval_params(serial.ctx, serial.final_state))


def test_cli_attaches_by_address(cluster, serial_rows, tmp_path, tmp_yaml):
    cfg = tmp_yaml(on_ray(CONFIGS["sync"], num_actors=2))
    out = tmp_path / "run"
    proc = subprocess.run(fedsim_cmd("run", str(cfg), f"ray.address={cluster.address}", "--out", str(out), "--quiet"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(rows) == serial_rows["sync"]
    assert cluster.address in (out / "config.yaml").read_text()


def test_every_ray_process_listens_on_loopback_only(cluster):
    assert ray.get(ray.remote(num_cpus=0)(lambda: 1).remote()) == 1  # a worker process, among those checked
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert exposed_sockets() == []


def test_killed_actor_is_replaced_and_results_do_not_change(cluster, serial_rows, tmp_path):
    marker = tmp_path / "killed"
    cfg = merge(CONFIGS["sync"], {"strategy": {"name": f"{FAULTS}:fedavg_dies_once", "marker": str(marker)}})
    run = run_config(on_ray(cfg, num_actors=2))
    assert marker.exists() and run.ctx.executor.replacements == 1
    assert strip(run.rows) == serial_rows["sync"]


def test_client_error_names_the_client_and_keeps_the_traceback(cluster):
    cfg = merge(CONFIGS["sync"], {"strategy": f"{FAULTS}:fedavg_raises"})
    with pytest.raises(ClientJobError) as serial:
        run_config(cfg)
    with pytest.raises(ClientJobError) as remote:
        run_config(on_ray(cfg, num_actors=2))
    err = remote.value
    assert (err.client, err.job_id) == (serial.value.client, serial.value.job_id)
    assert f"client {err.client} (job {err.job_id}) failed" in str(err)
    assert "ValueError: boom" in str(err) and "ray_faults.py" in str(err) and "Traceback" in str(err)


def test_client_error_can_drop_the_client(cluster, serial_rows):
    cfg = merge(CONFIGS["sync"], {"strategy": f"{FAULTS}:fedavg_raises"})
    serial = strip(run_config(merge(cfg, {"executor": {"on_client_error": "drop"}})).rows)
    remote = strip(run_config(on_ray(cfg, num_actors=2, on_client_error="drop")).rows)
    assert remote == serial
    assert serial[-1]["dropped"] > serial_rows["sync"][-1]["dropped"]


def test_silent_actor_is_replaced_after_job_timeout(cluster, serial_rows, tmp_path):
    marker = tmp_path / "stalled"
    cfg = merge(on_ray(CONFIGS["sync"], num_actors=1, job_timeout=3),
                {"strategy": {"name": f"{FAULTS}:fedavg_stalls", "marker": str(marker), "seconds": 600, "job": 6}})
    run = run_config(cfg)
    assert marker.exists() and run.ctx.executor.replacements == 1
    assert strip(run.rows) == serial_rows["sync"]


def test_run_goes_on_with_the_actors_left_when_a_lost_node_cannot_be_replaced(cluster, serial_rows, tmp_path):
    node = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    marker = tmp_path / "killed"
    groups = [{"num_actors": 1}, {"num_actors": 1, "resources": {"doomed": 1}}]  # the second only fits there
    cfg = merge(on_ray(CONFIGS["sync"], groups=groups),
                {"strategy": {"name": f"{FAULTS}:fedavg_loses_its_node", "marker": str(marker), "resource": "doomed"}})
    try:
        run = run_config(cfg)
    finally:
        cluster.remove_node(node, allow_graceful=False)
    assert marker.exists() and run.ctx.executor.replacements == 1
    assert strip(run.rows) == serial_rows["sync"]


def run_cli(cluster, cfg, out: Path, tmp_yaml) -> subprocess.Popen:
    """Starts `fedsim run` on `cfg`, attached to the cluster; its stderr goes to out.stderr."""
    err = open(out.with_suffix(".stderr"), "w")  # a file, not a pipe: Ray's driver can print a lot
    cmd = fedsim_cmd("run", str(tmp_yaml(cfg)), f"ray.address={cluster.address}", "--out", str(out), "--quiet")
    with err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)


def last_words(out: Path) -> tuple[list[str], str]:
    """Returns fedsim's own lines on the run's stderr and the whole of it."""
    text = out.with_suffix(".stderr").read_text()
    return [line for line in text.splitlines() if line.startswith("fedsim:")], text


def test_lost_node_ends_the_run_with_one_line_and_a_checkpoint(cluster, tmp_path, tmp_yaml):
    node = cluster.add_node(num_cpus=1, resources={"doomed": 1})  # the only node the run's actor fits on
    marker, out = tmp_path / "killed", tmp_path / "run"
    cfg = merge(on_ray(CONFIGS["sync"], num_actors=1, resources={"doomed": 1}, actor_start_timeout=20),
                {"strategy": {"name": f"{FAULTS}:fedavg_loses_its_node", "marker": str(marker), "resource": "doomed",
                              "job": 6}})
    proc = run_cli(cluster, cfg, out, tmp_yaml)
    try:
        proc.wait(timeout=300)
        ended = time.time()
    finally:
        proc.kill()
        cluster.remove_node(node, allow_graceful=False)
    ours, text = last_words(out)
    assert proc.returncode == 5 and len(ours) == 1 and "Traceback" not in text, text[-3000:]
    assert ours[0].startswith("fedsim: error: no Ray actor is left and none could be placed within "
                              "executor.actor_start_timeout=20 s")
    assert ours[0].endswith(f"; stopped at round 1 (checkpoint written); resume with: fedsim resume {out}")
    assert ended - marker.stat().st_mtime < 90  # Ray notices the lost node in ~15 s, then 20 s to place an actor
    payload, _ = ckpt.load_latest(out)
    assert payload["protocol_state"].rounds == 1


def test_sigterm_ends_a_run_blocked_on_ray_with_a_checkpoint(cluster, serial_rows, tmp_path, tmp_yaml):
    marker, out = tmp_path / "stalled", tmp_path / "run"
    cfg = merge(on_ray(CONFIGS["sync"], num_actors=1),
                {"strategy": {"name": f"{FAULTS}:fedavg_stalls", "marker": str(marker), "seconds": 60, "job": 6}})
    proc = run_cli(cluster, cfg, out, tmp_yaml)
    try:
        began = time.monotonic()
        while not marker.exists():  # the 6th job (round 2) has begun its 60 s sleep
            assert proc.poll() is None and time.monotonic() - began < 300, last_words(out)[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    ours, text = last_words(out)
    assert proc.returncode == 130 and ours == [
        f"fedsim: error: stopped by SIGTERM at round 1 (checkpoint written); resume with: fedsim resume {out}"
    ], text[-3000:]
    assert took < 15  # not the 60 s the job sleeps
    assert strip(resume(out, progress=False).rows) == serial_rows["sync"]  # the checkpoint is a sound one


def test_payloads_that_view_a_larger_tensor_are_compacted_before_put():
    import torch

    from fedsim.executors.ray_executor import _compact
    from fedsim.strategy import Payload

    stack = torch.arange(12.0).reshape(4, 3)
    row = _compact(Payload(stack[1], {"c": stack[2], "lr": 0.1}))
    assert torch.equal(row.params, stack[1]) and row.params.untyped_storage().nbytes() == 3 * 4
    assert row.extras["c"].untyped_storage().nbytes() == 3 * 4 and row.extras["lr"] == 0.1
    whole = Payload(stack)
    assert _compact(whole).params is stack  # nothing to compact: no copy



# worker: vmap — each cohort sharded over the actors, one vmap call per shard
VMAP_CONFIGS = {  # FedAvg: in the lost-actor test below
    "fedavg": digits_config(run={"rounds": 2, "eval_every": 2, "torch_threads": 1}),
    "scaffold": digits_config(run={"rounds": 3, "eval_every": 3, "torch_threads": 1}, strategy={"name": "scaffold"},
                              protocol={"clients_per_round": 6}),  # 6 of 8 clients a round: states come back
    "async": {**digits_config(run={"rounds": 4, "eval_every": 4, "torch_threads": 1}),
              "protocol": {"name": "async", "concurrency": 4, "buffer_size": 2}},
}


def final_model(run):
    return run.protocol.eval_params(run.ctx, run.final_state)


def assert_same_run(got, want):
    """Same model and metrics to float rounding (vmap's batched kernels round differently)."""
    torch.testing.assert_close(final_model(got), final_model(want), rtol=1e-4, atol=1e-6)
    assert [set(r) for r in strip(got.rows)] == [set(r) for r in strip(want.rows)]
    for a, b in zip(strip(got.rows), strip(want.rows)):
        for k, v in b.items():
            assert a[k] == (pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True) if isinstance(v, float) else v), k


@pytest.mark.parametrize("name", ["scaffold", "async"])
def test_vmap_worker_shards_each_cohort_and_equals_one_vmap_executor(cluster, name):
    cfg = VMAP_CONFIGS[name]
    one = run_config(merge(cfg, {"executor": {"kind": "vmap", "device": "cpu"}}))
    sharded = run_config(on_ray(cfg, num_actors=2, worker="vmap"))
    assert_same_run(sharded, one)
    assert_same_run(sharded, run_config(cfg))  # and the serial executor
    ex = sharded.ctx.executor
    assert len({a["node"] for a in ex.placement}) == 2 and {a["device"] for a in ex.placement} == {"cpu"}
    if name == "scaffold":  # every round's cohort went out as two shards, one per actor
        assert ex.shards == 2 * sharded.final_state.rounds
    else:  # jobs go out together when a result is needed: fewer calls than jobs
        assert 0 < ex.shards < sharded.final_state.next_job
    if name == "scaffold":  # client control variates went through the actors and came back
        got, want = dict(sharded.ctx.store.items()), dict(one.ctx.store.items())
        assert got.keys() == want.keys() and len(got) == 8
        for client, state in got.items():
            assert float(state["c"].abs().sum()) > 0
            torch.testing.assert_close(state["c"], want[client]["c"], rtol=1e-4, atol=1e-6)


def test_vmap_worker_reruns_a_lost_actors_shard(cluster, tmp_path):
    marker = tmp_path / "killed"
    cfg = merge(VMAP_CONFIGS["fedavg"], {"strategy": {"name": f"{FAULTS}:fedavg_dies_once", "marker": str(marker)}})
    run = run_config(on_ray(cfg, num_actors=2, worker="vmap"))
    # an actor dies in its second vmap call: that shard goes again, to the actors started then
    assert marker.exists() and run.ctx.executor.replacements == 1
    assert_same_run(run, run_config(merge(VMAP_CONFIGS["fedavg"], {"executor": {"kind": "vmap", "device": "cpu"}})))
    assert_same_run(run, run_config(VMAP_CONFIGS["fedavg"]))  # and the serial executor


@pytest.mark.cuda
def test_vmap_worker_two_actors_share_one_gpu(cluster):
    node = cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        cfg = VMAP_CONFIGS["scaffold"]
        one = run_config(merge(cfg, {"executor": {"kind": "vmap", "device": "cuda", "on_unsupported": "error"}}))
        sharded = run_config(on_ray(cfg, num_actors=2, num_gpus=0.5, worker="vmap"))
    finally:
        cluster.remove_node(node)
    assert {a["device"] for a in sharded.ctx.executor.placement} == {"cuda:0"}
    assert len({a["pid"] for a in sharded.ctx.executor.placement}) == 2
    # CUDA kernels for cohorts of 6 and of 3 round apart: the model to rounding (a test
    # sample's predicted class may flip, so the metrics are not compared)
    torch.testing.assert_close(final_model(sharded), final_model(one), rtol=1e-4, atol=1e-5)
