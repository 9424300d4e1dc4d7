"""A run that uses plugins can be resumed, and its saved config.yaml run again, from any
working folder: config.yaml records a file plugin's absolute path and the folders module
plugins were imported from.

Both kinds load the strategy tutorial's FedExP (docs/tutorial-strategy.md), whose server
state is a class of the plugin's own, so the checkpoint must also trust the plugin's module.
The first run is in this process, from the folder a user would run it from; resume and the
re-run are CLI processes started in another folder, with this checkout on PYTHONPATH.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from fedsim.checkpoint import list_checkpoints
from fedsim.config import load_config
from fedsim.outputs import read_jsonl
from fedsim.runner import execute

from .conftest import ROOT, fedsim_cmd, quadratic_config, tutorial_plugin
from .test_determinism import strip


def cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(fedsim_cmd(*args, "--quiet"), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def file_plugin(tmp: Path) -> tuple[Path, Path]:
    """A config next to its plugin file, named relative to it; run from the config's folder."""
    exp = tmp / "exp"
    exp.mkdir()
    tutorial_plugin("tutorial-strategy.md", exp, "my_fedexp.py")
    return write_config(exp, "my_fedexp.py", "fedexp"), exp


def module_plugin(tmp: Path) -> tuple[Path, Path]:
    """A plugin module in a package of the project folder, found from the working folder."""
    code = tmp / "project"
    (code / "mypkg").mkdir(parents=True)
    (code / "mypkg" / "__init__.py").write_text("")
    tutorial_plugin("tutorial-strategy.md", code / "mypkg", "fedexp.py")
    text = (code / "mypkg" / "fedexp.py").read_text()
    (code / "mypkg" / "fedexp.py").write_text(text.replace('register("fedexp")', 'register("fedexp_pkg")'))
    (tmp / "configs").mkdir()
    return write_config(tmp / "configs", "mypkg.fedexp", "fedexp_pkg"), code


def write_config(folder: Path, plugin: str, strategy: str) -> Path:
    cfg = quadratic_config(run={"rounds": 6, "eval_every": 1, "checkpoint_every": 1, "keep_checkpoints": 3},
                           strategy={"name": strategy})
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump({**cfg, "plugins": [plugin]}))
    return path


@pytest.mark.parametrize("make", [file_plugin, module_plugin], ids=["file", "module"])
def test_resume_and_rerun_from_another_folder(make, tmp_path, monkeypatch):
    config, workdir = make(tmp_path)
    monkeypatch.chdir(workdir)
    run = tmp_path / "runs" / "X"
    execute(load_config(config), run, progress=False)
    rows = strip(read_jsonl(run / "metrics.jsonl"))
    assert "global_lr" in rows[-1]  # the plugin's strategy ran

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    list_checkpoints(run)[-1].unlink()  # the newest (the end) goes: resume has rounds to redo
    cli("resume", str(run), cwd=elsewhere)
    assert strip(read_jsonl(run / "metrics.jsonl")) == rows

    again = tmp_path / "runs" / "again"
    cli("run", str(run / "config.yaml"), "--out", str(again), cwd=elsewhere)
    assert strip(read_jsonl(again / "metrics.jsonl")) == rows
