"""The ServerApp and ClientApp adapters, in-process (`LocalGrid`: real messages, no processes).

* sync: same metrics and model as fedsim's serial run (FedAvg with client sampling, and a
  SCAFFOLD whose c and Δc travel as extras and whose c_i stays on the node); a straggler
  cut by the deadline keeps its old state; a node that went away counts as dropped;
* async: the config's own asynchronous protocol on the wall clock — FedBuff and FedFix with
  one slow node perform the set number of aggregations and apply every arrived update
  exactly once (`probe` strategy);
* errors: nodes without or with wrong partitions, a failing ClientApp, bad run config.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import load_config
from fedsim.errors import ConfigError, DivergenceError, FedsimError
from fedsim.flower import client_app, deployment_config, run_on_grid
from fedsim.flower.settings import read_settings
from fedsim.runner import execute

from .conftest import ROOT, merge, quadratic_config
from .flower_local import LocalGrid

PLUGINS = [str(ROOT / "tests" / "flower_plugins.py")]


def flower_run(tmp_path: Path, cfg: dict, num_nodes: int | None = None, settings: dict | None = None, **grid):
    """Runs `cfg` through the ServerApp over a LocalGrid; returns (rows, final model, events, grid)."""
    out = tmp_path / "flower"
    grid.setdefault("every_node", {"plugins": " ".join(PLUGINS)})  # the nodes trust the test strategies
    grid = LocalGrid(client_app(), num_nodes or cfg["data"]["num_clients"], **grid)
    run = run_on_grid(grid, deployment_config(cfg), read_settings({**(settings or {}), "out-dir": str(out)}))
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()] if (out / "events.jsonl").exists() else []
    return run.rows, torch.load(out / "final_model.pt"), events, grid


def serial(cfg: dict):
    run = execute(load_config(cfg), None, progress=False)
    return run.rows, run.protocol.eval_params(run.ctx, run.final_state)


def small(**sections) -> dict:
    """A 6-client quadratic run with 3 clients sampled per round, 3 rounds."""
    base = quadratic_config(run={"rounds": 3, "eval_every": 1, "progress": False, "log_events": True},
                            protocol={"name": "sync", "clients_per_round": 3}, plugins=PLUGINS)
    base["data"]["num_clients"] = 6
    base["local"] = {"lr": 0.05, "batch_size": 1, "steps": 3}
    for k, v in sections.items():
        base[k] = v
    return base


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold_probe"])
def test_sync_matches_fedsim_serial_run(tmp_path, strategy):
    cfg = small(strategy={"name": strategy})
    rows, final, events, grid = flower_run(tmp_path, cfg)
    ref_rows, ref_final = serial(cfg)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-12)
    for a, b in zip(rows, ref_rows, strict=True):
        for key in ("round", "test_loss", "dist_to_opt", "train_loss", "bytes_up", "bytes_down", "participants"):
            assert a[key] == (b[key] if b[key] is None else pytest.approx(b[key], rel=1e-12)), key
    # the same keyed cohorts as the simulator: 3 of 6 clients per round
    dispatched = [[e["client"] for e in events if e["kind"] == "dispatch" and e["version"] == v] for v in range(3)]
    assert all(len(c) == 3 for c in dispatched) and len({tuple(c) for c in dispatched}) > 1


def test_straggler_keeps_its_old_state_and_lost_node_is_dropped(tmp_path):
    cfg = small(strategy={"name": "probe", "slots": 4}, protocol={"name": "sync", "deadline": 0.3})
    cfg["data"] = {"name": "quadratic", "num_clients": 3, "dim": 12}
    rows, counts, events, _ = flower_run(tmp_path, cfg, delays={0: [1.0, 0.0, 0.0]}, unavailable={2})
    counts = counts.reshape(3, 4)
    # client 0 missed the round-0 deadline: its next two jobs start again from count 0
    assert counts.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert (rows[-1]["stragglers"], rows[-1]["dropped"]) == (1, 3)
    assert [e["clients"] for e in events if e["kind"] == "aggregate"] == [[1], [0, 1], [0, 1]]


def probe_invariants(counts: torch.Tensor, events: list[dict], n: int, slots: int, aggregations: int) -> list[dict]:
    """Checks that every arrived update was applied at most once, in order; returns the aggregations."""
    merged = [e for e in events if e["kind"] == "aggregate"]
    arrived = [e["job"] for e in events if e["kind"] == "arrival"]
    applied = [j for e in merged for j in e["jobs"]]
    assert len(merged) == aggregations
    assert len(arrived) == len(set(arrived)) and len(applied) == len(set(applied)) and set(applied) <= set(arrived)
    counts = counts.reshape(n, slots)
    for i in range(n):
        m = sum(c == i for e in merged for c in e["clients"])
        assert counts[i].tolist() == [1.0] * m + [0.0] * (slots - m)
    return merged


def test_fedbuff_applies_each_update_once_and_does_not_wait_for_the_slow_node(tmp_path):
    n, slots = 3, 16
    cfg = small(strategy={"name": "probe", "slots": slots}, run={"rounds": 8, "log_events": True, "progress": False})
    cfg["data"] = {"name": "quadratic", "num_clients": n, "dim": n * slots}
    cfg["protocol"] = {"name": "async", "buffer_size": 2}
    rows, counts, events, _ = flower_run(tmp_path, cfg, delays={0: 0.4, 1: 0.02, 2: 0.05})
    merged = probe_invariants(counts, events, n, slots, 8)
    assert all(len(e["jobs"]) == 2 for e in merged)
    assert any(0 not in e["clients"] for e in merged) and any(0 in e["clients"] for e in merged)
    assert max(s for e in merged for s in e["staleness"]) >= 1  # the slow node's update was stale
    assert rows[-1]["aggregations"] == 8 and rows[-1]["staleness_max"] is not None


def test_fedfix_aggregates_at_window_boundaries(tmp_path):
    n, slots, window = 3, 16, 0.2
    cfg = small(strategy={"name": "probe", "slots": slots}, run={"rounds": 5, "log_events": True, "progress": False})
    cfg["data"] = {"name": "quadratic", "num_clients": n, "dim": n * slots}
    cfg["protocol"] = {"name": "async", "window": window, "weighting": "unbiased_online"}
    _, counts, events, _ = flower_run(tmp_path, cfg, delays={0: 0.5, 1: 0.0, 2: 0.0})
    merged = probe_invariants(counts, events, n, slots, 5)
    times = [e["time"] for e in merged]
    assert all(t >= window * (i + 1) - 1e-9 for i, t in enumerate(times))  # never before its boundary
    assert all(set(e["clients"]) >= {1, 2} for e in merged)  # the fast clients make every window
    assert any(0 not in e["clients"] for e in merged)


@pytest.mark.parametrize("protocol", [{"name": "async"},
                                      {"name": "async", "buffer_size": 2, "weighting": "unbiased_online"}],
                         ids=["async-fedavg", "fedbuff-unbiased-online"])
def test_async_on_the_wall_clock_is_the_simulators_protocol(tmp_path, protocol):
    # Nodes that answer at once arrive together, lowest client first: the order the simulator
    # gives clients of equal speed. The same protocol code then gives the same run, bit for bit
    # — staleness, weights (the online participation estimate too) and model.
    strategy = {"name": "fedavg", "server_lr": 0.5, "staleness": {"name": "polynomial", "a": 0.5}}
    cfg = quadratic_config(run={"rounds": 20, "eval_every": 5, "progress": False, "log_events": True},
                           strategy=strategy, protocol=protocol)
    cfg["data"]["num_clients"] = 4
    rows, final, events, _ = flower_run(tmp_path, cfg)
    sim = merge(cfg, {"system": {"compute": {"name": "constant", "step_time": 0.01}}})
    ref_rows, ref_final = serial(sim)
    assert torch.equal(final, ref_final)
    assert [r["dist_to_opt"] for r in rows] == [r["dist_to_opt"] for r in ref_rows]
    merged = [e for e in events if e["kind"] == "aggregate"]
    assert len(merged) == 20 and max(s for e in merged for s in e["staleness"]) == 4 - protocol.get("buffer_size", 1)


DATALESS = {"evaluation": "federated", "input-shape": "20", "num-classes": 10}


def test_a_dataless_server_never_builds_the_data_and_trains_as_fedsim(tmp_path):
    # the data source raises unless a node builds it; the server takes weights from the replies
    cfg = small(model={"name": "logreg"}, local={"lr": 0.1, "batch_size": 8, "steps": 2},
                data={"name": "synthetic_on_nodes", "num_clients": 3, "dim": 20, "max_samples_per_user": 30})
    rows, final, _, _ = flower_run(tmp_path, cfg, settings=DATALESS)
    ref = execute(load_config({**cfg, "data": {**cfg["data"], "name": "synthetic"}}), None, progress=False)
    torch.testing.assert_close(final, ref.protocol.eval_params(ref.ctx, ref.final_state), rtol=0, atol=1e-12)
    # federated evaluation: each node on its own (training) data, weighted by its sample count
    data = ref.ctx.data
    every = torch.as_tensor(np.concatenate(data.client_train))
    want = ref.ctx.task.evaluate(final, data.x_train[every], data.y_train[every])
    last = rows[-1]
    assert last["federated_test_loss"] == last["test_loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert last["federated_test_accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert last["federated_examples"] == len(every) and len(rows) == 4


def test_fedsims_clientapp_loads_its_own_data_with_load_data(tmp_path, monkeypatch):
    # Flower's load_data(partition_id, num_partitions) pattern on a fedsim node, no data on the server
    from . import flower_node_data

    cfg = small(model={"name": "logreg"}, local={"lr": 0.1, "batch_size": 8, "steps": 2},
                data={"name": "synthetic", "num_clients": 3, "dim": 20, "max_samples_per_user": 30})
    monkeypatch.setattr(flower_node_data, "CONFIG", cfg)
    monkeypatch.setattr("fedsim.runner.build_federated_data", lambda *a: pytest.fail("the config's data was built"))
    rows, final, _, _ = flower_run(tmp_path, cfg, settings=DATALESS,
                                   every_node={"plugins": " ".join(PLUGINS), "load-data": "tests.flower_node_data:load_data"})
    monkeypatch.undo()
    ref = execute(load_config(cfg), None, progress=False)
    torch.testing.assert_close(final, ref.protocol.eval_params(ref.ctx, ref.final_state), rtol=0, atol=1e-12)
    assert rows[-1]["federated_examples"] == sum(len(t) for t in ref.ctx.data.client_train)


def test_evaluation_both_adds_the_nodes_evaluation_to_the_servers(tmp_path):
    # quadratic: the server's test set is every client's samples, so the nodes' evaluation
    # (each on its own samples, weighted by their number) must give the same loss
    cfg = small(run={"rounds": 1, "eval_every": 1, "progress": False})
    rows, _, _, _ = flower_run(tmp_path, cfg, settings={"evaluation": "both"})
    assert [r["federated_examples"] for r in rows] == [6, 6]
    for r in rows:
        assert r["federated_test_loss"] == pytest.approx(r["test_loss"], rel=1e-12)
        assert r["federated_test_accuracy"] is None  # the quadratic task has no accuracy


def test_a_dataless_server_refuses_what_needs_the_data(tmp_path):
    cfg = small(model={"name": "logreg"}, data={"name": "synthetic_on_nodes", "num_clients": 3, "dim": 20})
    with pytest.raises(ConfigError, match="run-config.input-shape: .*got ''"):
        flower_run(tmp_path, cfg, settings={"evaluation": "federated"})
    unbiased = {**cfg, "protocol": {"name": "sync", "weighting": "unbiased_online"}}
    with pytest.raises(ConfigError, match="protocol.client_weights: 'samples' needs every client's sample count"):
        flower_run(tmp_path, unbiased, settings=DATALESS)


def test_a_stopped_serverapp_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    from flwr.app import Message

    cfg = small(run={"rounds": 4, "eval_every": 1, "checkpoint_every": 1, "progress": False})
    app = client_app()

    def node_lost_in_round_3(msg: Message, context):
        if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 3:
            raise RuntimeError("node lost")
        return app(msg, context)

    out = tmp_path / "flower"
    settings = {"out-dir": str(out)}
    with pytest.raises(FedsimError, match="node lost"):
        run_on_grid(LocalGrid(node_lost_in_round_3, 6, every_node={"plugins": " ".join(PLUGINS)}),
                    deployment_config(cfg), read_settings(settings))
    assert not (out / "final_model.pt").exists()
    grid = LocalGrid(app, 6, every_node={"plugins": " ".join(PLUGINS)})
    run = run_on_grid(grid, deployment_config(small()), read_settings({**settings, "resume": True}))
    ref_rows, ref_final = serial(cfg)
    torch.testing.assert_close(torch.load(out / "final_model.pt"), ref_final, rtol=0, atol=1e-12)
    assert [r["round"] for r in run.rows] == [0, 1, 2, 3, 4]
    for a, b in zip(run.rows, ref_rows, strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-12)
    assert min(m.content["config"]["server-round"] for m in grid.pushed if m.metadata.message_type == "train") == 3
    with pytest.raises(ConfigError, match="run-config.resume: needs out-dir to name a run folder with a checkpoint"):
        run_on_grid(grid, deployment_config(small()), read_settings({"out-dir": str(tmp_path / "none"), "resume": True}))


def test_nodes_must_cover_every_partition(tmp_path):
    cfg = small()
    five = {i: {"partition-id": i, "num-partitions": 6} for i in range(5)}
    with pytest.raises(FedsimError, match=r"partition\(s\) \[5\].*partition-id=K num-partitions=N"):
        flower_run(tmp_path, cfg, num_nodes=5, node_config=five, settings={"node-timeout": 0.3})
    with pytest.raises(FedsimError, match="could not join.*partition-id=0 num-partitions=5 does not fit the config's data.num_clients=6"):
        flower_run(tmp_path, cfg, num_nodes=6, node_config={i: {"partition-id": i, "num-partitions": 5} for i in range(6)})
    with pytest.raises(FedsimError, match="both have partition-id=0"):
        flower_run(tmp_path, cfg, num_nodes=6, node_config={5: {"partition-id": 0, "num-partitions": 6}})
    with pytest.raises(FedsimError, match="could not join.*no partition-id"):
        flower_run(tmp_path, cfg, num_nodes=6, node_config={3: {}})


def test_a_failing_client_or_a_diverging_update_stops_the_run(tmp_path):
    with pytest.raises(FedsimError, match=r"(?s)client \d \(job \d, node 10\d\d\) failed: .*boom on the client"):
        flower_run(tmp_path, small(strategy={"name": "fails_on_client"}))
    with pytest.raises(DivergenceError, match="NaN/inf"):
        flower_run(tmp_path / "b", small(local={"lr": 1e40, "batch_size": 1, "steps": 10}))


def test_run_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="reply_timout.*did you mean 'reply_timeout'"):
        read_settings({"reply-timout": 2})
    assert read_settings({"reply-timeout": 3, "poll-interval": 0.5}).reply_timeout == 3
    # Flower's usual keys set fedsim's (before the explicit overrides); other keys pass through
    got = read_settings({"num-server-rounds": 2, "lr": 0.1, "fraction-train": 0.5, "overrides": "seed=3",
                         "my-key": "x", "local-epochs": 2})
    assert got.overrides.split() == ["run.rounds=2", "local.lr=0.1", "protocol.fraction=0.5", "local.epochs=2", "seed=3"]
    assert dict(got.passthrough) == {"my-key": "x"}
    cfg = deployment_config(small(), got.overrides.split())
    assert (cfg.run.rounds, cfg.local.lr, cfg.local.epochs, cfg.seed) == (2, 0.1, 2, 3)
    with pytest.raises(ConfigError, match="protocol.weighting: 'unbiased' traces the schedule"):
        flower_run(tmp_path, small(protocol={"name": "async", "weighting": "unbiased"}))
    with pytest.raises(ConfigError, match="protocol.name: protocol 'decentralized' runs in simulation only"):
        flower_run(tmp_path, small(strategy={"name": "dfedavg"}, protocol={"name": "decentralized"}))


def test_only_the_flower_package_imports_flwr():
    offenders = subprocess.run(["grep", "-rlE", r"^\s*(import|from) flwr(\.|\s|$)", "fedsim", "strategies"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert offenders and all(p.startswith("fedsim/flower/") for p in offenders), offenders


EVIL_MODULE = '''
from pathlib import Path

from fedsim.registry import STRATEGIES

Path({marker!r}).write_text("imported")


def strategy():
    from strategies.fedavg import fedavg

    return fedavg()


if __name__.startswith("fedsim_plugin"):  # as a plugin
    STRATEGIES.register("evil_only")(strategy)
'''


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module that leaves a marker when it is imported (as `evil_factories`, or as a plugin
    .py file, which registers the strategy 'evil_only'); returns (marker, plugin file)."""
    from fedsim.flower.client import node_run

    marker = tmp_path / "marker.txt"
    (tmp_path / "evil_factories.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    plugin = tmp_path / "plugin" / "evil_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    node_run.cache_clear()
    yield marker, plugin
    node_run.cache_clear()


def test_node_refuses_a_dotted_factory_from_the_server_unless_its_node_config_allows(evil, monkeypatch):
    import yaml as _yaml

    from fedsim.flower.client import NodeTrust, node_run, node_trust

    marker, _ = evil
    text = _yaml.safe_dump(small(strategy={"name": "evil_factories:strategy"}))
    with pytest.raises(ConfigError, match="'evil_factories:strategy' is not a registered strategy; this node accepts "
                                          "only registered names"):
        node_run(text, node_trust({"partition-id": 0}))
    assert not marker.exists()
    node_run(text, node_trust({"partition-id": 0, "allow-dotted-factories": True})).ctx.executor.close()
    assert marker.exists()  # the node's own choice
    monkeypatch.setenv("FEDSIM_NODE_CONFIG", 'plugins="a.py b" allow-dotted-factories=true')
    assert node_trust({}) == NodeTrust(("a.py", "b"), True)
    assert node_trust({"allow-dotted-factories": False}) == NodeTrust(("a.py", "b"), False)


def test_node_imports_its_own_plugins_never_the_servers(evil):
    import yaml as _yaml

    from fedsim.flower.client import NodeTrust, node_run

    marker, plugin = evil
    text = _yaml.safe_dump(small(plugins=[str(plugin)]))  # fedavg: the plugin is not even needed
    node_run(text, NodeTrust()).ctx.executor.close()
    assert not marker.exists()
    text = _yaml.safe_dump(small(plugins=[str(plugin)], strategy={"name": "evil_only"}))
    with pytest.raises(ConfigError, match=r"unknown strategy 'evil_only'.*the server's config names plugins .* node "
                                          r"imports only from its own node config \(plugins="):
        node_run(text, NodeTrust())
    assert not marker.exists()
    node_run(text, NodeTrust((str(plugin),))).ctx.executor.close()  # the node's own plugin
    assert marker.exists()


def test_the_shipped_app_leaves_run_folders_and_certificates_out_of_the_fab(tmp_path):
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "flower_app"
    shutil.copytree(ROOT / "experiments" / "flower_app", app)
    (app / "runs" / "flower-x").mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        (app / "runs" / "flower-x" / name).write_text("{}")
    (app / "certificates").mkdir()
    (app / "certificates" / "secrets.yaml").write_text("key: 1")
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert "fedsim.yaml" in names
    assert not [n for n in names if n.startswith(("runs/", "certificates/"))], names
