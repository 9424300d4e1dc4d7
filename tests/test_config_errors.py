"""Bad configs stop before any work with exit status 2 and one line naming the key path."""
from __future__ import annotations

import subprocess

import pytest

from fedsim.cli import main

from .conftest import ROOT, digits_config, fedsim_cmd, merge


DEC = {"protocol": "decentralized", "strategy": "dfedavg"}  # names replace the sync sections
CASES = [
    # (change to the config, key path expected in the message, words expected)
    ({"strategy": {"server_lrr": 1.0}}, "strategy.server_lrr", "did you mean 'server_lr'"),
    ({"local": {"lr": "fast"}}, "local.lr", "expected float"),
    ({"data": {"num_clients": -3}}, "data.num_clients", ">= 1"),
    ({"data": {"partition": {"name": "dirichlet_per_class", "alpha": 0.0}}}, "data.partition.alpha", "> 0"),
    ({"protocol": {"fraction": 1.5}}, "protocol.fraction", "(0.0, 1.0]"),
    ({"strategy": {"name": "fedavgg"}}, "strategy.name", "did you mean 'fedavg'"),
    ({"run": {"rounds": None}}, "run", "stopping rule"),
    ({"sytem": {}}, "sytem", "unknown section"),
    ({"local": {"sampling": "random"}}, "local.sampling", "one of"),
    ({"protocol": {"clients_per_round": 100}}, "protocol.clients_per_round", "exceeds"),
    ({"model": {"name": "cnn", "channels": [0], "hidden": 16}}, "model.channels", "element 0"),
    ({"system": {"compute": {"name": "lognormal", "sigma": -1}}}, "system.compute.sigma", ">= 0"),
    ({"seed": "abc"}, "seed", "integer"),
    # decentralized runs: the topology section
    ({**DEC, "topology": {"name": "rign"}}, "topology.name", "did you mean 'ring'"),
    ({**DEC, "topology": {"name": "ring", "mixing": "metropolis"}}, "topology.mixing",
     "did you mean 'metropolis_hastings'"),
    ({**DEC, "topology": {"name": "erdos_renyi", "p": 0.01}}, "topology", "disconnected"),
    ({**DEC, "topology": {"name": "star", "mixing": "uniform"}}, "topology.mixing", "regular graph"),
    ({**DEC, "protocol": "async_gossip", "strategy": "gossip",
      "topology": {"name": "random_matching"}}, "topology.name", "static graph"),
    ({"protocol": {"name": "asynch"}}, "protocol.name", "did you mean 'async'"),
    ({"executor": {"kind": "seriall"}}, "executor.kind", "did you mean 'serial'"),
]


@pytest.mark.parametrize("change,path,words", CASES)
def test_bad_value_exit_2_names_key(tmp_yaml, tmp_path, capsys, change, path, words):
    cfg = merge(digits_config(), change)
    if change.get("run", {}).get("rounds", 1) is None:
        cfg["run"].pop("rounds")
    out = tmp_path / "run"
    code = main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"fedsim: error: {path}"), err
    assert words in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was started


def test_override_errors_name_the_key(tmp_yaml, capsys):
    code = main(["run", str(tmp_yaml(digits_config())), "local.batch_size=0", "--quiet"])
    assert code == 2
    assert "local.batch_size" in capsys.readouterr().err


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits\nrun: [")
    assert main(["run", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_config_files_that_are_not_configs(tmp_path, capsys):
    binary = tmp_path / "cfg.yaml"
    binary.write_bytes(bytes(range(256)))
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    for path, words in ((binary, "not a text (YAML) file"), (listing, "must be a mapping"),
                        (tmp_path, "is a folder, not a config file"), (tmp_path / "none.yaml", "not found")):
        assert main(["run", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_cli_subprocess_has_no_traceback(tmp_yaml):
    cfg = tmp_yaml(merge(digits_config(), {"data": {"partition": {"name": "dirichlet_per_class", "alpha": -1}}}))
    proc = subprocess.run(fedsim_cmd("run", str(cfg)), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "data.partition.alpha" in proc.stderr


def test_existing_run_folder_is_refused(tmp_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main(["run", str(tmp_yaml(digits_config())), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("protocol", [{"name": "async_gossip"}, {"name": "decentralized", "init": "independent"}])
def test_independent_init_of_a_model_without_initialisers_is_refused_before_any_file(tmp_yaml, tmp_path, capsys,
                                                                                       protocol):
    from .conftest import quadratic_config

    cfg = quadratic_config(protocol=protocol, strategy={"name": "gossip" if protocol["name"] == "async_gossip" else "dfedavg"},
                           topology={"name": "ring"}, run={"rounds": None, "time_budget": 0.1}
                           if protocol["name"] == "async_gossip" else {"rounds": 2})
    out = tmp_path / "run"
    code = main(["run", str(tmp_yaml(cfg)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedsim: error: protocol.init") and "use init: shared" in err, err
    assert not out.exists()
