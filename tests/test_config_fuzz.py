"""Property test: random wrong types, ranges and names never give a traceback or a half-written run."""
from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.cli import main
from fedsim.config import load_config
from fedsim.registry import EXECUTORS, PROTOCOLS, TOPOLOGIES

from .conftest import quadratic_config

BASE = quadratic_config(run={"rounds": 2, "eval_every": 1, "progress": False, "checkpoint_every": 0},
                        data={"num_clients": 4})
RESOLVED = load_config(BASE).resolved()


def key_paths(tree, prefix=()):
    for k, v in tree.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from key_paths(v, prefix + (k,))


PATHS = sorted(key_paths(RESOLVED)) + [("strategy", "bogus"), ("nonsense",), ("data", "partition", "name")]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(-1e3, 1e3),
    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    st.sampled_from(["", "abc", "fedavg", "natural", "1e-3", "-1", "ring", "mlp", "none"]),
    st.lists(st.integers(-2, 8), max_size=3),
    st.dictionaries(st.sampled_from(["name", "x", "a"]), st.integers(-1, 3), max_size=2),
)


def set_path(tree, path, value):
    node = tree
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3))
def test_random_configs_fail_cleanly(tmp_path_factory, mutations):
    cfg = yaml.safe_load(yaml.safe_dump(RESOLVED))
    for path, value in mutations:
        set_path(cfg, path, value)
    check_clean_failure(tmp_path_factory.mktemp("fuzz"), cfg)


def check_clean_failure(base: Path, cfg: dict) -> None:
    """Runs `cfg` through the CLI: it runs (exit 0, complete run folder), diverges (3) or is
    refused with one line (2) leaving no files — never a traceback."""
    cfg_file = base / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = base / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(cfg_file), "--out", str(out), "--quiet"])
    text = err.getvalue()
    assert "Traceback" not in text
    assert code in (0, 2, 3), text
    if code == 2:
        assert text.startswith("fedsim: error: ") and len(text.strip().splitlines()) == 1, text
        assert not out.exists() or not any(Path(out).iterdir()), "a failed config left files behind"
    if code == 0:
        assert (out / "summary.json").is_file()


# ---------------------------------------------------------------- protocol, topology, executor sections
def protocol_base(protocol: dict, strategy: str, budget: dict) -> dict:
    cfg = quadratic_config(data={"num_clients": 6}, strategy={"name": strategy}, protocol=protocol,
                           local={"steps": 2}, run={"progress": False, "checkpoint_every": 1, **budget})
    return load_config(cfg).resolved()


TWO_ROUNDS = {"rounds": 2, "eval_every": 1}
SHORT = {"rounds": None, "time_budget": 0.05, "eval_every_time": 0.02}
BASES = [
    protocol_base({"name": "async", "buffer_size": 2, "concurrency": 3}, "fedavg", SHORT),
    protocol_base({"name": "async", "window": 0.01}, "scaffold", SHORT),
    protocol_base({"name": "decentralized"}, "dfedavg", TWO_ROUNDS) | {"topology": {"name": "ring"}},
    protocol_base({"name": "async_gossip", "init": "shared"}, "gossip", SHORT)
    | {"topology": {"name": "random_regular", "degree": 3}},
]
SECTION_PATHS = sorted({p for base in BASES for p in key_paths(base) if p[0] in ("protocol", "topology", "executor")}
                       | {("topology",), ("topology", "name"), ("topology", "mixing"), ("topology", "degree"),
                          ("topology", "p"), ("topology", "k"), ("topology", "rows"), ("topology", "path"),
                          ("topology", "allow_disconnected"), ("executor", "num_actors"), ("executor", "device"),
                          ("ray", "num_cpus"), ("ray", "address"), ("strategy", "name")})
PROTOCOL_NAMES = st.sampled_from(["sync", "async", "asynch", "decentralized", "async_gossip", "gossip", ""])
TOPOLOGY_NAMES = st.sampled_from(["ring", "rign", "star", "complete", "erdos_renyi", "random_regular", "random_matching",
                              "grid", "torus", "watts_strogatz", "edge_list", "dynamic_regular", "one_peer_exponential"])
MIXING_NAMES = st.sampled_from(["metropolis_hastings", "uniform", "max_degree", "metropolis"])
NAMES = st.one_of(PROTOCOL_NAMES, TOPOLOGY_NAMES, MIXING_NAMES, st.sampled_from([
    "dfedavg", "fedavg", "serial", "vmap", "seriall", "cpu", "cuda", "auto", "/nonexistent/edges.txt",
]))  # executors: never 'ray' (a private Ray instance per example would take minutes)
SMALL_INT, UNIT = st.integers(-1, 8), st.floats(-0.5, 1.5)
KNOB_VALUE = st.one_of(SMALL_INT, UNIT, st.booleans(), st.none(), NAMES, st.sampled_from([float("nan"), 1e9]))


def knobs(registry, name: str) -> list[str]:
    """Returns the keyword knobs of a registered factory (none for an unknown name)."""
    if name not in registry.names():
        return []
    return [p for p in inspect.signature(registry.get(name).factory).parameters if p != "ctx"]


@st.composite
def section(draw, registry, names, key: str = "name", common: tuple[str, ...] = ()):
    """A whole section of a valid-looking shape: a name and a few of *its* knobs, random values —
    these get past the schema to the deeper checks (connectivity, mixing rule vs graph,
    protocol vs strategy, knob combinations)."""
    name = draw(names)
    chosen = draw(st.lists(st.sampled_from(knobs(registry, name) + list(common) or [key]), unique=True, max_size=3))
    return {key: name, **{k: draw(KNOB_VALUE) for k in chosen if k != key}}


MUTATION = st.one_of(
    st.tuples(st.sampled_from(SECTION_PATHS), st.one_of(VALUES, NAMES, UNIT, SMALL_INT)),
    st.tuples(st.just(("topology",)), section(TOPOLOGIES, TOPOLOGY_NAMES, common=("mixing", "allow_disconnected"))),
    st.tuples(st.just(("protocol",)), section(PROTOCOLS, PROTOCOL_NAMES)),
    st.tuples(st.just(("executor",)), section(EXECUTORS, st.sampled_from(["serial", "vmap", "seriall"]), key="kind")),
)


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "60")), deadline=None,  # ~0.2 s each
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(range(len(BASES))),
       mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_random_protocol_topology_executor_sections_fail_cleanly(tmp_path_factory, base, mutations):
    cfg = yaml.safe_load(yaml.safe_dump(BASES[base]))
    for path, value in mutations:
        set_path(cfg, path, value)
    check_clean_failure(tmp_path_factory.mktemp("fuzz"), cfg)
