"""`run.loggers`: CSV, TensorBoard and W&B sinks fed the rows of metrics.jsonl (also across a resume)."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from fedsim.cli import main
from fedsim.outputs import read_jsonl
from fedsim.runner import resume

from .conftest import quadratic_config, run_config


def csv_rows(path):
    with path.open() as fh:
        return [{k: None if v == "" else json.loads(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def jsonl_rows(path):
    return [{k: v for k, v in r.items()} for r in read_jsonl(path)]


def test_csv_holds_the_rows_of_metrics_jsonl_also_after_a_resume(tmp_path):
    out = tmp_path / "run"
    cfg = quadratic_config(run={"rounds": 20, "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 20,
                                "loggers": ["csv"]})
    run_config(cfg, out)
    rows = jsonl_rows(out / "metrics.jsonl")
    assert len(rows) == 11 and csv_rows(out / "metrics.csv") == rows
    # a crash after the 4th checkpoint: the later checkpoints and the end files never written
    for ckpt in sorted((out / "checkpoints").glob("ckpt-*.pt"))[4:]:
        ckpt.unlink()
    for name in ("summary.json", "final_model.pt", "curves.png"):
        (out / name).unlink()
    resume(out, progress=False)
    rows = jsonl_rows(out / "metrics.jsonl")
    assert len(rows) == 11 and csv_rows(out / "metrics.csv") == rows


@pytest.mark.parametrize("missing", ["tensorboard", "wandb"])
def test_a_missing_optional_package_is_a_one_line_config_error(missing, tmp_path, tmp_yaml, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # not importable, as when not installed
    assert importlib.util.find_spec(missing) is None
    cfg = tmp_yaml(quadratic_config(run={"loggers": ["csv", missing]}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"fedsim: error: run.loggers: {missing!r} needs the {missing} package: "
                           f"pip install 'fedsim[{missing}]' (or drop it from run.loggers)")
    assert not (tmp_path / "r").exists()


def test_unknown_logger_is_refused(tmp_path, tmp_yaml, capsys):
    cfg = tmp_yaml(quadratic_config(run={"loggers": ["csvv"]}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "run.loggers" in capsys.readouterr().err


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_config(quadratic_config(run={"rounds": 20, "eval_every": 5, "loggers": ["tensorboard"]}), out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rows = read_jsonl(out / "metrics.jsonl")
    got = [(e.step, e.value) for e in acc.Scalars("dist_to_opt")]
    assert got == [(i, pytest.approx(r["dist_to_opt"])) for i, r in enumerate(rows)]


def test_wandb_offline_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is fedsim's default
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written to the home folder
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    out = tmp_path / "run"
    run_config(quadratic_config(run={"rounds": 10, "eval_every": 5, "loggers": ["wandb"]}), out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and [f.stat().st_size > 0 for f in runs[0].glob("run-*.wandb")] == [True]
