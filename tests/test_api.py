"""fedsim.api: the documented Python API runs configs and sweeps as the command line does."""
from __future__ import annotations

import csv
import os
import re

import pytest

from fedsim import api
from fedsim.errors import ConfigError

from .conftest import ROOT, quadratic_config, run_config


def test_run_returns_the_rows_of_the_same_run(tmp_path):
    cfg = quadratic_config()
    rows = api.run(cfg, {"local.lr": 0.08, "run.rounds": 20})
    want = run_config(cfg, overrides=("local.lr=0.08", "run.rounds=20")).rows
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(want) and rows[-1]["round"] == 20
    written = api.run(cfg, ["run.rounds=10"], out=tmp_path / "r")
    assert strip(api.rows(tmp_path / "r")) == strip(written)


def test_errors_are_raised_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^local.lr: must be > 0"):
        api.run(quadratic_config(), {"local.lr": -1})


def test_override_text_reads_back_as_the_value():
    from fedsim.config.load import parse_overrides

    for value in (0.1, 3, True, None, [64, 64], {"name": "iid"}, "fedavg"):
        ((_, back),) = parse_overrides([f"k={api.override_text(value)}"])
        assert back == value


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path, monkeypatch):
    """The first code block of docs/python-api.md, executed as written (from a folder with experiments/)."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), flags=re.S).group(1)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "python-api.md", "exec"), scope)
    table = scope["table"]
    assert [(r["local.lr"], r["seed"], r["status"]) for r in table] == [
        ("0.05", 0, "done"), ("0.05", 1, "done"), ("0.1", 0, "done"), ("0.1", 1, "done")]
    with open("runs/api-sweep/sweep.csv") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == [r["run"] for r in table]
    assert os.path.isfile("runs/api-demo/metrics.jsonl")
