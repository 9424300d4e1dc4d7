"""Property test: random wrong types, ranges and names never give a traceback or a half-written run."""
from __future__ import annotations

import io
import contextlib
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.cli import main
from fedsim.config import load_config

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
    base = tmp_path_factory.mktemp("fuzz")
    cfg = yaml.safe_load(yaml.safe_dump(RESOLVED))
    for path, value in mutations:
        set_path(cfg, path, value)
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
        assert text.startswith("fedsim: error: "), text
        assert not out.exists() or not any(Path(out).iterdir()), "a failed config left files behind"
    if code == 0:
        assert (out / "summary.json").is_file()
