"""fedsim as a user gets it from `pip install`: an sdist, a wheel built from that sdist, and the
wheel installed into a fresh virtual environment, used from a folder that is not a checkout.

The environment reuses this interpreter's installed dependencies (torch, ray, ...) without
fedsim itself: a .pth file adds their site-packages folder as a plain path, so its own .pth
files — among them an editable install of a checkout — are not run, and only the wheel's
fedsim is importable. Nothing is downloaded (`python -m build --no-isolation`, pip with
--no-index).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, quadratic_config

SOURCES = ["pyproject.toml", "setup.py", "README.md", "fedsim", "strategies", "topologies", "experiments"]


def call(args: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Runs a command; returns its stdout, failing the test with its output when it fails."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def make_venv(folder: Path) -> Path:
    """Creates a virtual environment that sees this interpreter's site-packages as a plain
    path (their .pth files not run); returns its python."""
    call([sys.executable, "-m", "venv", "--without-pip", folder], cwd=folder.parent)
    python = folder / "bin" / "python"
    own = call([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder).strip()
    (Path(own) / "base_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_sdist_and_wheel_install_and_run_from_any_folder(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    # python -m build: the sdist, then the wheel built from it (so the sdist is complete)
    call([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source], cwd=tmp_path)
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    with tarfile.open(sdist) as tar:
        assert f"{sdist.name.removesuffix('.tar.gz')}/experiments/papers/vca/gossip.yaml" in tar.getnames()
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "fedsim" in tops and all(t.endswith(".dist-info") for t in tops - {"fedsim"}), tops  # nothing else on top
    assert {"fedsim/strategies/fedavg.py", "fedsim/topologies/mixing.py", "fedsim/experiments/quickstart.yaml",
            "fedsim/experiments/papers/vca/reproduce.py", "fedsim/experiments/papers/vca/results/claims.md"} <= set(names)

    python = make_venv(tmp_path / "venv")
    call([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)
    work = tmp_path / "work"  # not a checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    probe = ("import importlib.util, fedsim, fedsim.strategies.fedavg as f; "
             "print(fedsim.__file__); print(f.__file__); print(importlib.util.find_spec('strategies'), "
             "importlib.util.find_spec('topologies'))")
    where, strategy, missing = call([python, "-c", probe], cwd=work, env=env).splitlines()
    venv = str(tmp_path / "venv")
    assert where.startswith(venv) and strategy.startswith(venv), (where, strategy)
    assert missing == "None None", "import strategies / topologies must not find fedsim's"

    fedsim = python.parent / "fedsim"
    assert "fedavg" in call([fedsim, "list", "strategies"], cwd=work, env=env)
    cfg = quadratic_config(run={"rounds": 4, "eval_every": 2, "progress": False})
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    call([fedsim, "run", "tiny.yaml", "--out", "run"], cwd=work, env=env)
    assert (work / "run" / "metrics.jsonl").is_file()
    # the shortest reproduction: vca's quick mode cut to 10 virtual seconds (its verdicts need 200)
    call([fedsim, "reproduce", "vca", "--quick", "--set", "run.time_budget=10", "--out", "vca"], cwd=work, env=env)
    assert (work / "vca" / "claims.md").is_file() and (work / "vca" / "vca_accuracy_vs_time.png").is_file()
    call([fedsim, "gallery", "vca", "--docs", "docs"], cwd=work, env=env)  # from the shipped results
    assert (work / "docs" / "gallery" / "vca" / "vca_accuracy_vs_time.png").is_file()


def test_ray_upload_ships_one_fedsim_folder_in_the_installed_layout(tmp_path):
    """Ray's `upload` code mode ships the checkout as an installed fedsim would be: one folder
    named fedsim, strategies and topologies inside, importable without the checkout."""
    from fedsim.executors.ray_cluster import upload_env

    (folder,) = map(Path, upload_env()["py_modules"])
    assert folder.name == "fedsim" and (folder / "strategies" / "fedavg.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(folder.parent)}
    where = call([sys.executable, "-c", "import fedsim.topologies.mixing, fedsim.strategies.fedavg as f; print(f.__file__)"],
                 cwd=tmp_path, env=env).strip()
    assert where == str(folder / "strategies" / "fedavg.py")
