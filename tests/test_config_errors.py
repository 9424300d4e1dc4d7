"""Bad configs stop before any work with exit status 2 and one line naming the key path."""
from __future__ import annotations

import subprocess

import pytest

from fedsim.cli import main

from .conftest import ROOT, collector_paused, digits_config, fedsim_cmd, merge


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
    # spans below one tick of the virtual clock (1 ns)
    ({"protocol": {"deadline": 1e-12}}, "protocol.deadline", ">= 1e-09"),
    ({"system": {"availability": {"name": "bernoulli", "period": 1e-12}}}, "system.availability.period", ">= 1e-09"),
    ({"run": {"max_idle_time": 5e-185}}, "run.max_idle_time", ">= 1e-09"),  # found by the config fuzz (exit 4 at t = 0)
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
    # a mapping where a list belongs: OmegaConf's merge raises a bare TypeError naming no key
    ({"system": {"adversary": {"ids": {}}}}, "system.adversary.ids", "a mapping does not fit"),
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


# ---------------------------------------------------------------- the YAML file itself
def refused(capsys, argv: list[str], out) -> str:
    """Runs the CLI; asserts exit 2, exactly one line on stderr and no run folder; returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedsim: error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    return err


BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
                 + ["run: {rounds: 1}"])
YAML_CASES = [
    # (YAML text, start of the error line after 'fedsim: error: ', words in it)
    ("local: {lr: 0.05, lr: 5.0}\nrun: {rounds: 1}\n", "local.lr", "given twice"),
    ("run:\n  rounds: 1\n  rounds: 2\n", "run.rounds", "line 2, column 3, then line 3"),
    (BOMB, "e", "expands to more than 10,000 values"),  # 9**5 values at e, 9**9 at i
    ("a: &a [*a]\nrun: {rounds: 1}\n", "a", "refers to a node that contains it"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\nrun: {rounds: 1}\n", "", "nested more than 50 levels deep"),
    ("a:\n" + "".join("  " * i + "k:\n" for i in range(1, 3000)), "", "nested more than 50 levels deep"),
    ("run: {rounds: 1}\n1: x\n", "", "keys must be strings, got '1'"),
    ("run: {rounds: 1}\nlocal: {on: true}\n", "local", "keys must be strings, got 'on'"),
    ("run: {rounds: 1}\nname: 2024-01-01\n", "name", "a YAML timestamp is not a config value"),
    ("run: {rounds: 1}\nname: !!binary aGVsbG8=\n", "name", "a YAML binary is not a config value"),
]


@pytest.mark.parametrize("text,path,words", YAML_CASES, ids=[
    "duplicate-flow", "duplicate-block", "alias-bomb", "recursive-alias", "deep-flow", "deep-block", "int-key",
    "bool-key", "timestamp", "binary"])
def test_yaml_that_a_config_never_needs_is_refused_quickly(tmp_path, capsys, text, path, words):
    import time

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    with collector_paused():
        start = time.perf_counter()
        err = refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"], tmp_path / "run")
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert err.startswith(f"fedsim: error: {path}") and words in err, err


def test_merge_keys_may_be_overridden_and_aliases_shared(tmp_path):
    from fedsim.config import load_config

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("local: &l {lr: 0.05, batch_size: 8}\n"
                   "run: {rounds: 1}\n"
                   "strategy: {name: fedavg}\n"
                   "data: {name: quadratic, partition: natural}\n"
                   "model: vector\n")
    assert load_config(cfg).local.lr == 0.05
    cfg.write_text("x: &base {lr: 0.05, batch_size: 8}\nrun: {rounds: 1}\n")  # `x` is refused, not its YAML
    with pytest.raises(Exception, match="x: unknown section"):
        load_config(cfg)
    cfg.write_text("run: &r {rounds: 1}\nlocal:\n  <<: {lr: 0.05, batch_size: 8}\n  lr: 0.2\n")
    assert load_config(cfg).local.lr == 0.2 and load_config(cfg).local.batch_size == 8


def test_override_values_are_read_by_the_same_rules(tmp_yaml, tmp_path, capsys):
    cfg = tmp_yaml(digits_config())
    err = refused(capsys, ["run", str(cfg), "local={lr: 0.1, lr: 9}", "--out", str(tmp_path / "run"), "--quiet"],
                  tmp_path / "run")
    assert err.startswith("fedsim: error: local.lr: given twice (override 'local={lr: 0.1, lr: 9}'"), err
    bomb = "[" + ",".join(["&a [x,x,x,x,x,x,x,x,x,x]"] + ["*a"] * 9) + "]"  # fine: 100 values
    assert main(["run", str(cfg), f"data.extra={bomb}", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "data.extra: unknown key" in capsys.readouterr().err
    big = "&a0 [x,x,x,x,x,x,x,x,x]"
    for i in range(1, 8):
        big = f"[{big}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
        big = big.replace("[", f"&a{i} [", 1) if i < 7 else big
    err = refused(capsys, ["run", str(cfg), f"data.extra={big}", "--out", str(tmp_path / "run"), "--quiet"],
                  tmp_path / "run")
    assert err.startswith("fedsim: error: data.extra") and "expands to more than 10,000 values" in err, err


# ---------------------------------------------------------------- interpolations
def test_interpolation_that_doubles_itself_is_refused_before_resolving(tmp_path, capsys):
    lines = ["run: {rounds: 1}", "local:", "  a0: xxxxxxxxxx"]
    lines += [f"  a{i}: '${{.a{i - 1}}}${{.a{i - 1}}}'" for i in range(1, 41)]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    err = refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"], tmp_path / "run")
    assert err.startswith("fedsim: error: local.a") and "more than 1,000,000 characters" in err


def test_environment_interpolations_are_resolved_once_and_recorded(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv("FEDSIM_TEST_CLIENTS", "5")
    monkeypatch.setenv("FEDSIM_TEST_PATH", "${oc.env:HOME}")
    cfg = merge(digits_config(run={"rounds": 1}), {"name": "env-${oc.env:FEDSIM_TEST_CLIENTS}",
                                                   "data": {"num_clients": "${oc.env:FEDSIM_TEST_CLIENTS}"}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "${" not in saved
    assert yaml.safe_load(saved)["data"]["num_clients"] == 5 and yaml.safe_load(saved)["name"] == "env-5"
    # an environment value holding '${' would be resolved again when config.yaml is read: refused
    cfg["name"] = "${oc.env:FEDSIM_TEST_PATH}"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    err = refused(capsys, ["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "r2"), "--quiet"], tmp_path / "r2")
    assert err.startswith("fedsim: error: name: still holds '${'"), err
    cfg["name"] = "\\${oc.env:HOME}"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    refused(capsys, ["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "r2"), "--quiet"], tmp_path / "r2")


# ---------------------------------------------------------------- values that escaped the checks
@pytest.mark.parametrize("name", ["../../escaped", "a/b", "", "x\ny"])
def test_run_name_must_be_one_folder_name(tmp_yaml, tmp_path, monkeypatch, capsys, name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = tmp_yaml(digits_config(name=name, run={"rounds": 1}))
    err = refused(capsys, ["run", str(cfg), "--quiet"], work / "runs")
    assert err.startswith("fedsim: error: name: must be usable as a folder name"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "work"] and not any(work.iterdir())


def test_a_population_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_yaml, tmp_path, capsys):
    cfg = tmp_yaml(merge(digits_config(), {"data": {"num_clients": 1_000_000_000_000}}))
    err = refused(capsys, ["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"], tmp_path / "run")
    assert err.startswith("fedsim: error: data.num_clients: 1,000,000,000,000 clients need at least") and "TiB" in err


PLUGIN = '''
import sys

from fedsim.registry import STRATEGIES


def not_a_strategy():
    return {"aggregate": None}


def exits():
    sys.exit(0)


def compute(ctx):
    return {"step_time": 1.0}


@STRATEGIES.register("exits_when_built")
def exits_when_built():
    """A registered strategy whose factory calls sys.exit."""
    sys.exit(3)
'''


@pytest.mark.parametrize("change,path,words", [
    ({"data": {"name": "os:system", "command": "true"}}, "data.name", "os:system failed: TypeError"),
    ({"strategy": {"name": "fedsim_test_factories:not_a_strategy"}}, "strategy.name", "returned dict, not a ServerStrategy or GossipStrategy"),
    ({"strategy": {"name": "fedsim_test_factories:exits"}}, "strategy.name", "failed: sys.exit(0)"),
    ({"data": {"partition": "os:getcwd"}}, "data.partition.name", "os:getcwd failed: TypeError"),
    ({"system": {"compute": "fedsim_test_factories:compute"}}, "system.compute.name",
     "returned dict, not a ComputeModel"),
    ({"system": {"compute": "builtins:dict"}}, "system.compute.name",
     "cannot read the keyword arguments of 'builtins:dict'"),
    ({"model": {"name": "torch.nn:Linear", "in_features": 8, "out_features": 10}}, "model",
     "torch.nn:Linear gives outputs of shape [2, 1, 8, 10] for 2 inputs; the data needs [2, 10]"),
    ({"model": {"name": "torch.nn:Linear", "in_features": 64, "out_features": 10}}, "model",
     "does not accept the data's inputs of shape [1, 8, 8]: RuntimeError"),
    ({"plugins": ["exits_on_import.py"]}, "plugins", "'exits_on_import.py' called sys.exit(0) while being imported"),
    ({"plugins": ["fedsim_test_factories"], "strategy": {"name": "exits_when_built"}}, "",
     "sys.exit(3) was called by the run's code"),
])
def test_factories_that_do_not_fit_are_one_line_before_any_file(tmp_path, monkeypatch, capsys, change, path, words):
    import yaml

    (tmp_path / "fedsim_test_factories.py").write_text(PLUGIN)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {**digits_config(run={"rounds": 1}), **change}  # the changed sections replace the digits ones
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    err = refused(capsys, ["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"],
                  tmp_path / "run")
    assert err.startswith(f"fedsim: error: {path}") and words in err, err


def test_one_line_reports_take_the_first_line_of_any_message():
    from fedsim.errors import first_line

    assert first_line(AssertionError()) == ""  # an empty message (indexing its lines would fail)
    assert first_line(ValueError("\n  shape mismatch\nat layer 3")) == "shape mismatch"
    assert first_line(ValueError("x" * 500)) == "x" * 300 and len(first_line(ValueError("x" * 500), None)) == 500
