"""The fedfix paper folder: every run's config is valid, and the measurements behind its claims."""
from __future__ import annotations

import json

import pytest

from fedsim.config import load_config
from fedsim.reproduce import PAPERS_DIR, load_paper

paper = load_paper("fedfix")


def test_runs_cover_seven_schemes_two_scenarios_and_load():
    assert len(paper.RUNS) == 7 * 2 * len(paper.LRS)
    quick = [s for s in paper.RUNS if s.quick_seeds != ()]
    assert len(quick) == 14
    for spec in paper.RUNS:
        cfg = load_config(PAPERS_DIR / "fedfix" / spec.config, [*spec.overrides, *spec.quick])
        assert cfg.protocol.name == "async"
        assert cfg.run.time_budget == paper.QUICK_BUDGET


def rows(losses, dt=1.0):
    return [{"virtual_time": k * dt, "test_loss": v} for k, v in enumerate(losses)]


def test_time_to_reach_and_instability():
    r = rows([2.0, 1.5, 1.8, 0.9, 1.2, 0.8])
    assert paper.time_to_reach(r, 1.0) == 3.0
    assert paper.time_to_reach(r, 0.1) is None
    assert paper.regression(r) == pytest.approx(0.3)  # 1.2 after a best of 0.9
    assert paper.regression(rows([3.0, 2.0, 1.0])) == 0.0
    assert paper.tail_loss(rows([5.0, 4.0, 3.0, 2.0, 1.0, 1.0]), share=0.2) == 1.0


def test_best_learning_rate_is_the_lowest_tail_loss(tmp_path):
    results = {}
    for lr, final in ((0.003, 0.9), (0.01, 0.5), (0.03, 0.7)):
        folder = tmp_path / str(lr)
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows([2.0, 1.0, final])) + "\n")
        results[f"Async F-80 lr={lr}"] = [folder]
    best = paper.best_runs(results)
    assert best[("Async", "F-80")][0] == 0.01
