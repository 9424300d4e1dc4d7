"""`fedsim plot` overlays runs; `fedsim list` shows the registries."""
from __future__ import annotations

import pytest

from fedsim.cli import main

from .conftest import digits_config, run_config


def test_plot_overlays_two_runs(tmp_path, capsys):
    run_config(digits_config(run={"rounds": 2}), tmp_path / "a")
    run_config(digits_config(seed=3, run={"rounds": 2}), tmp_path / "b")
    out = tmp_path / "cmp.png"
    code = main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--x", "virtual_time", "--y", "test_accuracy",
                 "-o", str(out)])
    assert code == 0
    assert out.stat().st_size > 5000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_non_run_folder(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_list_shows_registered_names(capsys):
    assert main(["list", "strategies"]) == 0
    assert "fedavg" in capsys.readouterr().out
    assert main(["list", "partitions"]) == 0
    out = capsys.readouterr().out
    for name in ("iid", "dirichlet_per_class", "dirichlet_per_client", "shards", "natural"):
        assert name in out


def test_overrides_may_follow_options(tmp_path, tmp_yaml):
    cfg = tmp_yaml(digits_config(run={"rounds": 4, "progress": False}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet", "run.rounds=2"]) == 0
    assert '"round": 2' in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"round": 4' not in (tmp_path / "r" / "metrics.jsonl").read_text()


def test_unknown_option_after_config_is_refused(tmp_path, tmp_yaml, capsys):
    cfg = tmp_yaml(digits_config(run={"rounds": 2}))
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
