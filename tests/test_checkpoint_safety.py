"""A checkpoint is data: a crafted checkpoint file can make `fedsim resume` refuse (one line)
or skip it as unreadable, never construct or call anything but fedsim's registered state
classes. Each attack below would create a marker file (or truncate a victim file) if the
decoder followed what the file names; the marker must never appear."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fedsim.checkpoint import decode, encode, list_checkpoints
from fedsim.cli import main
from fedsim.errors import FedsimError
from fedsim.outputs import read_jsonl
from fedsim.state_types import checkpointable

from .conftest import quadratic_config, run_config


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run folder with checkpoints (copied by each test before tampering)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    run_config(quadratic_config(run={"rounds": 6, "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 2}), out)
    return out


def tampered_copy(finished_run: Path, tmp_path: Path, change) -> Path:
    """Copies the run and writes a newer checkpoint: the newest one with `change(payload tree)` applied."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "final_model.pt").unlink()
    newest = list_checkpoints(out)[-1]
    tree = torch.load(newest, weights_only=True)
    change(tree["__dict__"])
    torch.save(tree, out / "checkpoints" / "ckpt-000000099.pt")
    return out


def in_server_state(entry):
    """Puts `entry` where the strategy's server state lives (decoded before anything runs)."""
    def change(payload):
        payload["protocol_state"]["fields"]["server"] = entry
    return change


def as_driver(entry):
    def change(payload):
        payload["driver"] = entry
    return change


def marker_command(marker: Path) -> list[str]:
    return ["sh", "-c", f"touch {marker}"]


ATTACKS = {
    # an attribute chain from a fedsim module to subprocess.Popen, called with the file's arguments
    "attribute_chain_popen": lambda m, v: in_server_state(
        {"__namedtuple__": "fedsim.plots:matplotlib.subprocess.Popen", "items": [marker_command(m)]}),
    "attribute_chain_dataclass": lambda m, v: as_driver(
        {"__dataclass__": "fedsim.runner:subprocess.Popen", "fields": {"args": marker_command(m)}}),
    # a class reached through a module: opening the victim for writing truncates it
    "attribute_chain_fileio": lambda m, v: in_server_state(
        {"__namedtuple__": "fedsim.checkpoint:tempfile._io.FileIO", "items": [str(v), "w"]}),
    # functions, not classes
    "os_system": lambda m, v: in_server_state({"__namedtuple__": "os:system", "items": [f"touch {m}"]}),
    "fedsim_function": lambda m, v: in_server_state(
        {"__namedtuple__": "fedsim.outputs:write_atomic", "items": [str(v), "overwritten"]}),
    # importing a module that runs code when imported
    "module_with_side_effects": lambda m, v: in_server_state(
        {"__namedtuple__": "fedsim.__main__:X", "items": []}),
    # a real fedsim named tuple that is not state: a Strategy holds callables
    "unregistered_fedsim_class": lambda m, v: in_server_state(
        {"__namedtuple__": "fedsim.strategy:Strategy", "items": [None] * 3}),
    "not_a_string": lambda m, v: in_server_state({"__namedtuple__": ["fedsim.blocks", "ServerState"], "items": []}),
}
SKIPPED = {
    # registered classes with fields they do not have, or a value of the wrong shape: unreadable
    "dataclass_odd_field": as_driver({"__dataclass__": "fedsim.runner:DriverState",
                                      "fields": {"next_eval": None, "__class__": "os:system"}}),
    "dataclass_fields_not_a_mapping": as_driver({"__dataclass__": "fedsim.runner:DriverState",
                                                 "fields": [["sh", "-c", "id"]]}),
    "dataclass_as_named_tuple": in_server_state({"__namedtuple__": "fedsim.runner:DriverState", "items": [0]}),
    "named_tuple_too_many_items": in_server_state(
        {"__namedtuple__": "fedsim.blocks:ServerState", "items": [1, 2, 3, 4]}),
    "object_array": in_server_state({"__ndarray__": torch.zeros(2), "dtype": "object"}),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_crafted_checkpoint_is_refused_and_runs_nothing(attack, finished_run, tmp_path, capsys):
    marker, victim = tmp_path / "marker.txt", tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tampered_copy(finished_run, tmp_path, ATTACKS[attack](marker, victim))
    code = main(["resume", str(out), "--quiet"])
    err = capsys.readouterr().err
    time.sleep(0.2)  # a spawned process would have touched the marker by now
    assert not marker.exists() and victim.read_text() == "precious"
    assert code == 2, err
    assert err.startswith(f"fedsim: error: checkpoint {out / 'checkpoints' / 'ckpt-000000099.pt'}: it names ")
    assert "not a registered state class" in err and len(err.strip().splitlines()) == 1, err
    assert "fedsim.__main__" not in sys.modules or attack != "module_with_side_effects"


@pytest.mark.parametrize("shape", sorted(SKIPPED))
def test_malformed_entries_of_registered_classes_are_skipped_as_unreadable(shape, finished_run, tmp_path):
    out = tampered_copy(finished_run, tmp_path, SKIPPED[shape])
    with pytest.warns(UserWarning, match="ckpt-000000099.pt is unreadable"):
        assert main(["resume", str(out), "--quiet"]) == 0
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(finished_run / "metrics.jsonl"))


def test_store_entry_must_be_a_store_folder_beside_the_checkpoint(finished_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def change(payload):
        payload["store"] = "../../elsewhere"

    out = tampered_copy(finished_run, tmp_path, change)
    assert main(["resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a store-NNNNNNNNN folder" in err and len(err.strip().splitlines()) == 1


def test_spilled_store_index_names_only_files_of_its_folder(tmp_path):
    from fedsim.state_store import ClientStateStore

    store = ClientStateStore(memory_bytes=0, spill_root=tmp_path)
    store.put(0, {"c": torch.ones(3)})
    snap = tmp_path / "snap"
    store.snapshot(snap)
    index = (snap / "index.json").read_text()
    (snap / "index.json").write_text(index.replace('"states-0.bin"', '"../secret.bin"'))
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a file of its folder"):
        ClientStateStore().restore(snap)
    (snap / "index.json").write_text(index.replace('"float32"', '"load"'))
    with pytest.raises(ValueError, match="not a torch dtype"):
        ClientStateStore().restore(snap)


@checkpointable
class PluginState(NamedTuple):
    params: torch.Tensor
    step: int


class UnregisteredState(NamedTuple):
    params: torch.Tensor


def test_registered_plugin_state_round_trips_and_unregistered_is_refused_when_saved():
    back = decode(encode({"s": PluginState(torch.arange(3.0), 4)}))["s"]
    assert isinstance(back, PluginState) and back.step == 4 and torch.equal(back.params, torch.arange(3.0))
    with pytest.raises(FedsimError, match="UnregisteredState: a state class must be registered with @checkpointable"):
        encode(UnregisteredState(torch.zeros(1)))
    with pytest.raises(TypeError):
        checkpointable(dict)


def test_checkpoints_naming_the_old_top_level_strategies_package_still_load():
    """Before the built-in strategies moved under fedsim's namespace, checkpoints named their
    state classes ``strategies.x:Cls``; those tags load as the fedsim.strategies classes, and
    nothing but registered classes does under the old prefix either."""
    from fedsim.strategies.scaffold import ScaffoldState

    tree = encode({"s": ScaffoldState(torch.arange(3.0), torch.ones(3))})
    assert tree["__dict__"]["s"]["__namedtuple__"] == "fedsim.strategies.scaffold:ScaffoldState"
    tree["__dict__"]["s"]["__namedtuple__"] = "strategies.scaffold:ScaffoldState"
    back = decode(tree)["s"]
    assert type(back) is ScaffoldState and torch.equal(back.c, torch.ones(3))
    tree["__dict__"]["s"]["__namedtuple__"] = "strategies.scaffold:torch.nn.Linear"
    with pytest.raises(FedsimError, match="not a registered state class"):
        decode(tree)


def test_every_strategy_checkpoints_and_loads_back(tmp_path):
    """Each built-in strategy's state (under the asynchronous protocol: in-flight
    jobs, their results and payloads too) is made of registered classes only."""
    import warnings

    from fedsim.checkpoint import load_latest
    from fedsim.config import load_config
    from fedsim.registry import STRATEGIES
    from fedsim.runner import build, drive

    from .conftest import merge

    from fedsim.strategy import ServerStrategy

    extra = {"compressed": {"inner": "fedavg", "compressor": {"name": "qsgd", "bits": 2}, "feedback": "econtrol"}}
    gossip = {"protocol": {"name": "decentralized"}, "topology": {"name": "ring"}}
    choco = {"protocol": {"name": "decentralized", "compression": {"compressor": {"name": "topk", "ratio": 0.5},
                                                                   "gamma": 0.2}}, "topology": {"name": "ring"}}
    base = quadratic_config(run={"rounds": 2, "eval_every": 1, "checkpoint_every": 1})
    builtin = [e.name for e in STRATEGIES.entries() if e.factory.__module__.startswith("fedsim.strategies.")]
    assert len(builtin) > 20
    cases = []
    for name in builtin:
        strategy = {"name": name, **extra.get(name, {})}
        built = load_config(merge(base, {"strategy": strategy})).strategy.build()
        if isinstance(built, ServerStrategy):  # asynchronous where it may: in-flight jobs are in the state
            proto = "async" if built.protocols is None or "async" in built.protocols else built.protocols[0]
            cases.append((name, strategy, {"protocol": {"name": proto, "buffer_size": 2, "concurrency": 4}
                                           if proto == "async" else {"name": proto}}))
        else:
            cases.append((name, strategy, gossip))
    cases.append(("gossip+choco", {"name": "gossip"}, choco))  # the channel's per-node state, in the run's memory
    for name, strategy, proto in cases:
        cfg = merge(base, proto)
        cfg["strategy"] = strategy
        out = tmp_path / name
        out.mkdir()
        drive(build(load_config(cfg)), out, progress=False)  # checkpoints only: no summary, no plot
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unreadable checkpoint would only warn
            payload, _ = load_latest(out)
        assert payload["protocol_state"].rounds == 2, name


def test_a_fresh_process_loads_a_checkpoint_without_the_config(tmp_path):
    """The built-in state classes are registered before decoding, whatever was imported."""
    import subprocess

    from .conftest import ROOT

    out = tmp_path / "run"
    run_config(quadratic_config(protocol={"name": "async", "buffer_size": 2}, strategy={"name": "scaffold"},
                                run={"rounds": 3, "eval_every": 1, "checkpoint_every": 1}), out)
    code = (f"from pathlib import Path; from fedsim.checkpoint import load_latest; "
            f"print(type(load_latest(Path({str(out)!r}))[0]['protocol_state']).__name__)")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "AsyncState", done.stderr
