"""Executes docs/your-data.md's source plugin and config as written, on device files the test writes."""
from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from .conftest import ROOT


def page_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "docs" / "your-data.md").read_text(), flags=re.S)


def test_the_pages_source_plugin_runs_with_every_device_a_client(tmp_path):
    from fedsim.config import load_config
    from fedsim.runner import execute

    (tmp_path / "my_source.py").write_text(page_blocks("python")[0])
    cfg = yaml.safe_load(page_blocks("yaml")[-1])
    rng = np.random.default_rng(0)
    (tmp_path / "dev").mkdir()
    for d, n in enumerate([20, 30, 25, 40, 15]):
        y = rng.integers(0, 4, n)
        np.savez(tmp_path / "dev" / f"d{d}.npz", x=rng.normal(size=(n, 6)) + y[:, None], y=y)
    cfg["data"]["root"] = str(tmp_path / "dev")
    cfg["run"] = {"rounds": 3, "progress": False}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    run = execute(load_config(tmp_path / "my.yaml"), tmp_path / "run", progress=False)
    data = run.ctx.data
    assert data.num_clients == 5 and data.samples_per_client().tolist() == [16, 24, 20, 32, 12]
    assert [len(t) for t in data.client_test] == [4, 6, 5, 8, 3]
    assert 0 <= run.rows[-1]["client_acc_min"] <= run.rows[-1]["client_acc_mean"] <= 1


def test_the_pages_source_says_what_it_expected(tmp_path):
    from fedsim.config import load_config
    from fedsim.errors import DataError
    from fedsim.runner import build

    (tmp_path / "my_source.py").write_text(page_blocks("python")[0])
    cfg = yaml.safe_load(page_blocks("yaml")[-1])
    cfg["data"]["root"] = str(tmp_path / "none")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match="no \\*.npz in .*none: put one <device>.npz"):
        build(load_config(tmp_path / "my.yaml"))
