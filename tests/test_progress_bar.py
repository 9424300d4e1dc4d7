"""The progress bar of a resumed run starts where the run stopped; a time budget counts virtual seconds."""
from __future__ import annotations

import re

from fedsim.runner import resume

from .conftest import quadratic_config, run_config


def interrupted_at_round_8(out):
    """A finished run of 20 rounds, cut back to its checkpoint after round 8 (as if killed there)."""
    run_config(quadratic_config(run={"rounds": 20, "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 20}),
               out)
    for ckpt in sorted((out / "checkpoints").glob("ckpt-*.pt"))[5:]:  # 1: round 0, …, 5: round 8
        ckpt.unlink()
    for name in ("summary.json", "final_model.pt", "curves.png"):
        (out / name).unlink()


def test_a_resumed_bar_starts_where_the_run_stopped(tmp_path, capsys):
    interrupted_at_round_8(tmp_path / "run")
    capsys.readouterr()
    resume(tmp_path / "run", progress=True)
    shown = re.findall(r"(\d+)/20", capsys.readouterr().err)
    assert shown[0] == "8" and shown[-1] == "20", shown


def test_a_time_budget_bar_counts_virtual_seconds(capsys):
    from fedsim.config import load_config
    from fedsim.runner import execute

    execute(load_config(quadratic_config(run={"rounds": None, "time_budget": 1.0, "eval_every": 10})), None,
            progress=True)
    err = capsys.readouterr().err
    assert "virtual s/s" in err or "s/virtual s" in err, err[-500:]
