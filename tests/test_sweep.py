"""`fedsim sweep`: one run folder per combination × seed, equal to a single run of that config,
resumed after an interruption, failures reported without stopping the others, and the tables."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedsim.sweep import is_finished, parse_axes, parse_seeds, plan, split_values, sweep

from .conftest import ROOT, fedsim_cmd, quadratic_config, run_config

AXES = ["run.rounds=10,60"]  # the short runs end first; the long ones are then interrupted midway
SEEDS = "0,1"


def sweep_config() -> dict:
    # a checkpoint at every evaluation, so that an interrupted run has one to resume from
    return quadratic_config(run={"rounds": 60, "eval_every": 2, "checkpoint_every": 1})


def without_wall(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(folder: Path, fresh: Path) -> None:
    """The sweep's run folder holds what a single run of the same config writes (wall times apart)."""
    assert is_finished(folder)
    assert (folder / "config.yaml").read_text() == (fresh / "config.yaml").read_text()
    assert without_wall(read_rows(folder / "metrics.jsonl")) == without_wall(read_rows(fresh / "metrics.jsonl"))
    got, want = (json.loads((f / "summary.json").read_text()) for f in (folder, fresh))
    for s in (got, want):
        s.pop("wall_time")
        s["final"].pop("wall_time")
    assert got == want
    assert torch.equal(torch.load(folder / "final_model.pt"), torch.load(fresh / "final_model.pt"))
    assert {p.name for p in folder.iterdir()} == {p.name for p in fresh.iterdir()}


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def wait_until(check, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_single_runs(tmp_path, tmp_yaml):
    cfg = tmp_yaml(sweep_config())
    out = tmp_path / "sweep"
    cmd = fedsim_cmd("sweep", str(cfg), *AXES, "--seeds", SEEDS, "--out", str(out), "--workers", "2")
    runs = plan(parse_axes(AXES), parse_seeds(SEEDS))
    folders = [out / r.name for r in runs]
    assert [f.name for f in folders] == ["run.rounds=10__seed=0", "run.rounds=10__seed=1",
                                         "run.rounds=60__seed=0", "run.rounds=60__seed=1"]

    def one_done_one_midway() -> bool:  # a long run has written its 4th checkpoint (of 31)
        return any(is_finished(f) for f in folders) and any((f / "checkpoints" / "ckpt-000000004.pt").exists()
                                                            for f in folders[2:])

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        caught = wait_until(one_done_one_midway, 240)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the sweep and its workers
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert caught, "the sweep ended before it could be interrupted midway"
    assert proc.returncode == 130, err[-2000:]
    assert "INTERRUPTED: stopped by SIGINT" in stdout and "sweep stopped by SIGINT" in err
    unfinished = [f for f in folders if not is_finished(f)]
    assert unfinished and len(unfinished) < len(folders)

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and lines[-1].startswith("[4/4")
    assert sum("finished earlier" in line for line in lines) == len(folders) - len(unfinished), again.stdout
    assert any("resumed to the end" in line for line in lines), again.stdout

    for run, folder in zip(runs, folders):
        fresh = tmp_path / "fresh" / run.name
        from fedsim.config import load_config
        from fedsim.runner import execute

        execute(load_config(cfg, run.overrides()), fresh, progress=False)
        assert_same_run(folder, fresh)

    table = read_csv(out / "sweep.csv")
    assert [(r["run"], r["run.rounds"], r["seed"], r["status"]) for r in table] == [
        (r.name, r.values[0][1], str(r.seed), "done") for r in runs]
    for r, folder in zip(table, folders):
        final = json.loads((folder / "summary.json").read_text())["final"]
        assert float(r["dist_to_opt"]) == final["dist_to_opt"]
    summary = read_csv(out / "summary.csv")
    assert [(s["run.rounds"], s["n"]) for s in summary] == [("10", "2"), ("60", "2")]
    for s in summary:
        xs = [float(r["dist_to_opt"]) for r in table if r["run.rounds"] == s["run.rounds"]]
        assert float(s["dist_to_opt_mean"]) == pytest.approx(sum(xs) / 2)
        assert float(s["dist_to_opt_std"]) == pytest.approx(abs(xs[0] - xs[1]) / 2 ** 0.5)


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path):
    lines: list[str] = []
    cfg = quadratic_config(run={"rounds": 20, "eval_every": 5})
    rows = sweep(cfg, parse_axes(["local.lr=0.05,40"]), [0], tmp_path / "s", workers=1, print_line=lines.append)
    assert [(r["local.lr"], r["status"]) for r in rows] == [("0.05", "done"), ("40", "failed")]
    assert rows[1]["error"].startswith("the test loss is inf")
    assert any("FAILED" in line and "local.lr=40" in line for line in lines)
    fresh = run_config(cfg, tmp_path / "fresh", overrides=("local.lr=0.05", "seed=0"))
    assert rows[0]["dist_to_opt"] == fresh.rows[-1]["dist_to_opt"]
    summary = read_csv(tmp_path / "s" / "summary.csv")
    assert [(s["local.lr"], s["n"]) for s in summary] == [("0.05", "1"), ("40", "0")]


def test_bad_arguments_are_one_line_errors(tmp_path, tmp_yaml, capsys):
    from fedsim.cli import main

    cfg = str(tmp_yaml(quadratic_config()))
    for argv, says in [
        (["local.lr"], "expected KEY=VALUE"),
        (["seed=1,2"], "--seeds"),
        (["local.lr=0.1,"], "empty value"),
        (["local.lr=-1,0.1"], "local.lr"),  # a bad value stops the sweep before anything runs
        (["local.lr=0.1", "--seeds", "a"], "--seeds: expected integers"),
    ]:
        assert main(["sweep", cfg, *argv, "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedsim: error: ") and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_values_split_outside_brackets():
    assert split_values("a,[1,2],{x: 1, y: 2}, 'p,q'") == ["a", "[1,2]", "{x: 1, y: 2}", "'p,q'"]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]


def test_config_keys_keep_their_order_in_every_process(tmp_yaml):
    """A sweep compares a run folder's config.yaml with the config it would write: the text must
    not depend on the process (string hashing is randomised per process)."""
    cfg = tmp_yaml(quadratic_config(system={"compute": {"name": "constant", "jitter": "lognormal"}}))
    code = ("import sys, yaml; from fedsim.config import load_config; "
            "sys.stdout.write(yaml.safe_dump(load_config(sys.argv[1]).resolved(), sort_keys=False))")
    texts = {subprocess.run([fedsim_cmd()[0], "-c", code, str(cfg)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT)},
                            check=True).stdout for seed in (1, 2, 3)}
    assert len(texts) == 1
