"""Property test: random wrong types, ranges and names never give a traceback or a half-written run."""
from __future__ import annotations

import contextlib
import inspect
import io
import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.cli import main
from fedsim.config import load_config
from fedsim.registry import EXECUTORS, PROTOCOLS, TOPOLOGIES

from .conftest import collector_paused, quadratic_config

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


# ---------------------------------------------------------------- YAML documents
ODD_SCALARS = [
    "x", "fedavg", "1", "-0", "0x1F", "0o17", "1_000", "1e400", "-1e-400", ".nan", "-.inf", "~", "null", "yes", "on",
    "off", "2024-01-01", "2001-12-14t21:59:43.10-05:00", "!!binary aGk=", "!!set {a, b}", "!!str 1", "!!float 1",
    "!!python/object:os.system x", "!!omap [a: 1]", "'${oc.env:HOME}'", "'${nope}'", "'\\${x}'", "'${.a}${.a}'", "'???'",
    "'é✓'", "'" + "x" * 3000 + "'", "*undefined", "&", "!", "|", "'a: b'", "[]", "{}", "? [a]", "<<",
]
KEYS = ["name", "seed", "plugins", "data", "model", "strategy", "local", "system", "protocol", "executor", "run",
        "topology", "ray", "lr", "a", "num_clients", "rounds", "1", "on", "null", "<<", "'spaced key'"]


def flow(draw, depth: int) -> str:
    """A random flow-style YAML node: an odd scalar, a list, or a mapping (keys may repeat)."""
    kind = draw(st.sampled_from(["scalar", "scalar", "list", "map"] if depth < 4 else ["scalar"]))
    if kind == "scalar":
        return draw(st.sampled_from(ODD_SCALARS))
    items = draw(st.integers(0, 3))
    if kind == "list":
        return "[" + ", ".join(flow(draw, depth + 1) for _ in range(items)) + "]"
    return "{" + ", ".join(f"{draw(st.sampled_from(KEYS))}: {flow(draw, depth + 1)}" for _ in range(items)) + "}"


@st.composite
def yaml_documents(draw) -> str:
    """A config-shaped YAML text: valid sections (a quadratic run) among lines that repeat
    keys, define and expand aliases (up to 10**12 values), nest deeply and hold odd scalars."""
    lines = [f"{k}: {json.dumps(v)}"  # JSON is YAML's flow style
             for k, v in RESOLVED.items() if draw(st.booleans()) or k in ("run", "data")]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["node", "aliases", "nesting", "duplicate", "merge"]))
        at = draw(st.integers(0, len(lines)))
        if kind == "node":
            lines.insert(at, f"{draw(st.sampled_from(KEYS))}: {flow(draw, 0)}")
        elif kind == "aliases":  # a chain of lists, each repeating the previous one `fan` times
            fan, levels = draw(st.integers(1, 10)), draw(st.integers(1, 12))
            target = draw(st.sampled_from(["local", "strategy", "data", "x"]))
            a = f"a{len(lines)}_"  # anchors unique in the document
            chain = [f"  l0: &{a}0 {flow(draw, 2)}"]
            chain += [f"  l{i}: &{a}{i} [{', '.join([f'*{a}{i - 1}'] * fan)}]" for i in range(1, levels)]
            lines.insert(at, f"{target}:\n" + "\n".join(chain))
        elif kind == "nesting":
            n = draw(st.sampled_from([3, 49, 50, 51, 400, 5000]))
            lines.insert(at, f"{draw(st.sampled_from(KEYS))}: " + "[" * n + "]" * n)
        elif kind == "duplicate" and lines:
            lines.insert(at, draw(st.sampled_from(lines)))
        elif kind == "merge":
            lines.insert(at, "local: {<<: " + draw(st.sampled_from(["{lr: 0.1}", "[{lr: 0.1}, {steps: 2}]", "1"]))
                         + ", lr: 0.2}")
    return "\n".join(lines) + "\n"


def _warm_cli(base: Path) -> None:
    """Imports what `fedsim list` imports (every registry's built-ins), outside the timing."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["list"]) == 0


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=yaml_documents())
def test_yaml_documents_load_or_fail_in_one_line_within_a_second(tmp_path_factory, text):
    import time

    base = tmp_path_factory.mktemp("yamlfuzz")
    _warm_cli(base)
    cfg = base / "cfg.yaml"
    cfg.write_text(text)
    err = io.StringIO()
    with collector_paused():
        start = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["list", "strategies", str(cfg)])  # the real loader behind the CLI's error handling
        elapsed = time.perf_counter() - start
    message = err.getvalue()
    assert elapsed < 1.0, f"{elapsed:.2f} s for:\n{text[:2000]}"
    assert code in (0, 2), message
    if code == 2:
        assert message.startswith("fedsim: error: ") and len(message.strip().splitlines()) == 1, message
