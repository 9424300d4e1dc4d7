"""The same config and seed give identical metrics apart from wall time."""
from __future__ import annotations

import json
import subprocess

from .conftest import ROOT, digits_config, fedsim_cmd, run_config


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def test_same_seed_same_metrics_in_process():
    cfg = digits_config(system={"compute": {"name": "lognormal"}, "dropout": {"name": "bernoulli", "p": 0.2}},
                        protocol={"deadline": 0.12})
    a = run_config(cfg).rows
    b = run_config(cfg).rows
    assert strip(a) == strip(b)
    assert a[-1]["stragglers"] > 0 and a[-1]["dropped"] > 0  # the random parts were exercised
    assert a[-1]["test_accuracy"] > 0.2  # learning happened (chance is 0.1)


def test_different_seed_changes_results():
    a = run_config(digits_config()).rows
    b = run_config(digits_config(seed=2)).rows
    assert strip(a) != strip(b)


def test_cli_runs_are_identical(tmp_path, tmp_yaml):
    cfg = tmp_yaml(digits_config(run={"rounds": 3, "eval_every": 1}))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run(fedsim_cmd("run", str(cfg), "--out", str(out), "--quiet"), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"run folder: {out}" in proc.stdout
        for f in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
            assert (out / f).is_file()
        outs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert strip(outs[0]) == strip(outs[1])
    assert len(outs[0]) == 4
