"""fedsim strategies in real Flower runs started with `flwr run`, checked against fedsim itself.

* Flower's simulation engine runs the shipped app (experiments/flower_app, with a SCAFFOLD
  whose c_i the simulated nodes keep) and gives the model trajectory of `fedsim run` on
  the same config.
* A deployment on 127.0.0.1 (SuperLink + two SuperNodes, insecure) runs a SCAFFOLD (control
  variates as payload extras, c_i as node state) for two rounds: metrics and final model
  equal fedsim's serial run up to float rounding.
* The config's asynchronous protocol on three SuperNodes, one delayed on purpose: FedBuff (K = 2)
  performs exactly the set number of aggregations, the fast nodes do not wait for the slow
  one, and no update is lost or applied twice (the `probe` strategy counts applications).
* Interoperation with ordinary Flower apps, over TLS with SuperNode authentication (three
  registered nodes get in, a fourth with an unregistered key does not): a Flower user's own quickstart-style ClientApp
  (tests/flower_user_app) trained by fedsim's FedAvg, SCAFFOLD (with the client-side helper,
  from a ServerApp that has no dataset and evaluates on the nodes) and FedBuff (buffer size and concurrency visible in its events); Flower's own FedAvg
  ServerApp driving fedsim's ClientApp (tests/flower_fedavg_app); a failing ServerApp leaves
  the run ``finished:failed`` with fedsim's one-line reason, and ``fedsim flower-run`` exits
  non-zero with it (0 when the run completed).

Flower starts one process per job on a SuperNode, so these tests take minutes; they are
marked slow. Every process is stopped afterwards, also on failure.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from fedsim.config import load_config
from fedsim.outputs import read_jsonl
from fedsim.registry import STRATEGIES
from fedsim.runner import execute

from .flower_deploy import ROOT, Deployment

pytestmark = pytest.mark.slow
APP = ROOT / "experiments" / "flower_app"
PLUGINS = str(ROOT / "tests" / "flower_plugins.py")


def serial(config, overrides=()):
    """Runs the config with fedsim's serial executor; returns (rows, final model)."""
    run = execute(load_config(config, overrides), None, progress=False)
    return run.rows, run.protocol.eval_params(run.ctx, run.final_state)


def flower_result(out: Path, dep: Deployment, res) -> tuple[list[dict], torch.Tensor]:
    """Returns the Flower run's metrics rows and final model, or fails with every log."""
    if not (out / "summary.json").exists():
        pytest.fail(f"the Flower run left no results (exit {res.returncode}):\n{res.stdout[-4000:]}\n{dep.logs()}")
    return read_jsonl(out / "metrics.jsonl"), torch.load(out / "final_model.pt")


def assert_same_trajectory(rows, final, ref_rows, ref_final) -> None:
    """Same rounds, metrics and bytes as fedsim's own run; models equal up to float rounding."""
    assert [r["round"] for r in rows] == [r["round"] for r in ref_rows]
    for a, b in zip(rows, ref_rows):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5, abs=1e-6)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)
        assert (a["train_loss"] is None) == (b["train_loss"] is None)
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert (a["bytes_up"], a["bytes_down"], a["participants"]) == (b["bytes_up"], b["bytes_down"], b["participants"])
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-6)


def test_flower_simulation_engine_matches_fedsim(tmp_path):
    # the shipped app, with a stateful strategy: Flower's simulated nodes keep c_i between rounds
    overrides = ["run.rounds=2", "strategy.name=scaffold_probe", f"plugins=[{PLUGINS}]"]
    # simulated nodes have no node config of their own: they trust the test plugin through their environment
    dep = Deployment(tmp_path, simulation=True, env={"FEDSIM_NODE_CONFIG": f'plugins="{PLUGINS}"'})
    try:
        out = tmp_path / "out"
        res = dep.run(APP, {"overrides": " ".join(overrides), "out-dir": str(out)},
                      federation_config="num-supernodes=3 client-resources-num-cpus=1")
        rows, final = flower_result(out, dep, res)
    finally:
        dep.stop()
    assert not dep.leftovers()
    assert_same_trajectory(rows, final, *serial(APP / "fedsim.yaml", overrides))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("deploy"),
                     nodes=[f'partition-id={i} num-partitions=2 plugins="{PLUGINS}"' for i in range(2)])
    yield dep
    dep.stop()
    assert not dep.leftovers()


# SCAFFOLD as a node-side plugin (the built-in one is deployed by the ordinary-ClientApp SCAFFOLD
# test); FedAvg takes the same path without the state (and is the dataless user-app deployment's)
SYNC_STRATEGIES = ["scaffold_probe"]


@pytest.mark.parametrize("strategy", SYNC_STRATEGIES)
def test_deployment_sync_matches_serial(two_nodes, tmp_path, strategy):
    cfg = {
        "name": f"deploy-{strategy}", "seed": 3, "plugins": [PLUGINS],
        "data": {"name": "synthetic", "num_clients": 2, "max_samples_per_user": 80, "dim": 20},
        "model": {"name": "logreg"}, "strategy": {"name": strategy},
        "local": {"lr": 0.05, "batch_size": 16, "steps": 4},
        "run": {"rounds": 2, "eval_every": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    res = two_nodes.run(APP, {"config": str(path), "out-dir": str(out)})
    rows, final = flower_result(out, two_nodes, res)
    assert_same_trajectory(rows, final, *serial(path))


def test_deployment_async_fedbuff_loses_and_repeats_nothing(tmp_path):
    n, slots, aggregations, k = 3, 8, 3, 2
    cfg = {
        "name": "deploy-fedbuff", "seed": 0, "plugins": [PLUGINS],
        "data": {"name": "quadratic", "num_clients": n, "dim": n * slots},
        "model": {"name": "vector"}, "strategy": {"name": "probe", "slots": slots},
        "local": {"lr": 0.1, "batch_size": 1, "steps": 1},
        "protocol": {"name": "async", "buffer_size": k},
        "run": {"rounds": aggregations, "log_events": True},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    nodes = [f'partition-id={i} num-partitions={n} plugins="{PLUGINS}"' + (" delay=20.0" if i == 0 else "")
             for i in range(n)]
    dep = Deployment(tmp_path, nodes=nodes)
    try:
        out = tmp_path / "out"
        res = dep.run(APP, {"config": str(path), "out-dir": str(out)})
        _, counts = flower_result(out, dep, res)
    finally:
        dep.stop()
    assert not dep.leftovers()

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    merged = [e for e in events if e["kind"] == "aggregate"]
    arrived = [e["job"] for e in events if e["kind"] == "arrival"]
    applied = [j for e in merged for j in e["jobs"]]
    assert len(merged) == aggregations and all(len(e["jobs"]) == k for e in merged)
    assert len(applied) == len(set(applied)) and set(applied) <= set(arrived)
    assert len(arrived) == len(set(arrived))
    assert any(0 not in e["clients"] for e in merged)  # the fast nodes did not wait for the delayed one
    # the probe's model counts every application per (client, job of that client): all 0/1,
    # each client's applied jobs are its first ones, and they are the logged aggregations
    counts = counts.reshape(n, slots)
    per_client = [sum(c == i for e in merged for c in e["clients"]) for i in range(n)]
    assert set(counts.unique().tolist()) <= {0.0, 1.0}
    for i in range(n):
        assert counts[i].tolist() == [1.0] * per_client[i] + [0.0] * (slots - per_client[i])


USER_APP = ROOT / "tests" / "flower_user_app"
FEDAVG_APP = ROOT / "tests" / "flower_fedavg_app"


@pytest.fixture(scope="module")
def user_nodes(tmp_path_factory):
    """Three SuperNodes for the apps whose nodes need no fedsim plugins, over TLS with SuperNode
    authentication (docs/flower.md's multi-machine recipe), plus one node whose key was never
    registered."""
    dep = Deployment(tmp_path_factory.mktemp("user"), nodes=[f"partition-id={i} num-partitions=3" for i in range(3)],
                     secure=True, unregistered=1)
    yield dep
    dep.stop()
    assert not dep.leftovers()


def user_config_file(tmp_path: Path, **changes) -> Path:
    from .test_flower_interop import user_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(user_config(data={"num_clients": 3}, **changes)))
    return path


def test_deployment_fedsim_scaffold_trains_an_ordinary_clientapp_with_the_helper(user_nodes, tmp_path):
    # (FedAvg and the other stateless strategies take the same path without the helper; their
    # in-process tests are in test_flower_interop.py, FedBuff's deployment test below)
    from fedsim.runner import build

    from .test_flower_interop import scaffold_reference

    from .test_flower_interop import user_evaluation

    # the data exists only on the nodes: the ServerApp builds none, and evaluates on the nodes
    path = user_config_file(tmp_path, strategy={"name": "scaffold"}, run={"eval_every": 2})
    out = tmp_path / "out"
    dataless = {"evaluation": "federated", "input-shape": "20", "num-classes": 10}
    res = user_nodes.run(USER_APP, {"config": str(path), "out-dir": str(out), **dataless}, via_fedsim=True)
    rows, final = flower_result(out, user_nodes, res)
    assert res.returncode == 0  # fedsim flower-run: the run completed
    x0 = build(load_config(path)).ctx.task.initial_params()
    # every partition trains once per round whichever node serves which client
    torch.testing.assert_close(final, scaffold_reference(x0, range(3), 2, 0.1, 3), rtol=1e-5, atol=1e-6)
    assert [r["round"] for r in rows] == [0, 2]
    assert rows[-1]["federated_test_loss"] == pytest.approx(user_evaluation(final, range(3))[0], rel=1e-5)
    assert "fedsim: evaluation 1: test_loss=" in res.stdout  # every evaluation is in the ServerApp's log


def test_deployment_fedbuff_settings_show_in_events_with_an_ordinary_clientapp(user_nodes, tmp_path):
    from .test_flower_interop import most_in_flight

    path = user_config_file(tmp_path, protocol={"name": "async", "buffer_size": 2, "concurrency": 2},
                            run={"rounds": 2})
    out = tmp_path / "out"
    res = user_nodes.run(USER_APP, {"config": str(path), "out-dir": str(out)})
    flower_result(out, user_nodes, res)
    events = read_jsonl(out / "events.jsonl")
    merged = [e for e in events if e["kind"] == "aggregate"]
    assert len(merged) == 2 and all(len(e["jobs"]) == 2 for e in merged)
    assert most_in_flight(events) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["protocol"]["buffer_size"] == 2


def test_deployment_flowers_fedavg_drives_fedsims_clientapp(user_nodes, tmp_path):
    from fedsim.flower.records import record_to_vector
    from flwr.app import ArrayRecord

    out = tmp_path / "result.pt"
    res = user_nodes.run(FEDAVG_APP, {"out": str(out), "num-server-rounds": 1})
    if not out.exists():
        pytest.fail(f"Flower's ServerApp left no result (exit {res.returncode}):\n{res.stdout[-4000:]}\n{user_nodes.logs()}")
    got = torch.load(out)
    ref = execute(load_config(FEDAVG_APP / "fedsim.yaml", ["run.rounds=1"]), None, progress=False)
    layout = ref.ctx.task.layout
    final = record_to_vector(ArrayRecord(got["model"]), layout)
    torch.testing.assert_close(final, ref.protocol.eval_params(ref.ctx, ref.final_state), rtol=1e-5, atol=1e-6)
    assert set(got["evaluate"][1]) >= {"eval_loss", "eval_acc"}  # Flower's federated evaluation on fedsim clients


def test_deployment_a_failing_serverapp_fails_the_run(user_nodes, tmp_path):
    # through `fedsim flower-run`: flwr run's stream, then the run's outcome as the exit status
    res = user_nodes.run(USER_APP, {"overrides": "strategy.name=no_such_strategy", "out-dir": str(tmp_path / "out")},
                         via_fedsim=True)
    assert "fedsim: error: strategy.name" in res.stdout, res.stdout[-3000:]
    run_id = re.search(r"run_id `(\d+)`", res.stdout).group(1)
    last = next(r for r in user_nodes.runs() if r["run-id"] == run_id)
    assert last["status"] == "finished:failed"
    assert "strategy.name" in last["status-details"] and "no_such_strategy" in last["status-details"]
    assert not (tmp_path / "out").exists()
    assert res.returncode == 1
    assert re.search(rf"(?m)^fedsim: error: Flower run {run_id} finished:failed: .*strategy.name.*no_such_strategy",
                     res.stdout), res.stdout[-3000:]


def test_deployment_over_tls_lets_in_only_registered_supernodes(user_nodes):
    # the other user_nodes tests ran their apps over this TLS link; here: who got in
    import json

    listed = json.loads(user_nodes.flwr("supernode", "list", "test", "--format", "json").stdout)["nodes"]
    assert sorted(n["status"] for n in listed) == ["online"] * 3  # the unregistered fourth node is not among them
    link_log = (user_nodes.workdir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log
    assert "https://127.0.0.1" in link_log
