"""The fedfix paper folder: every run's config is valid, and the measurements behind its claims."""
from __future__ import annotations

import json

import pytest

from fedsim.config import load_config
from fedsim.reproduce import PAPERS_DIR, load_paper

paper = load_paper("fedfix")


def test_runs_cover_seven_schemes_two_controls_two_scenarios_and_load():
    assert len(paper.RUNS) == (7 + 2) * 2 * len(paper.LRS)
    quick = [s for s in paper.RUNS if s.quick_seeds != ()]
    assert len(quick) == 18
    assert paper.STEP_OF == {"FedFix-0.2": 5, "FedFix-0.5": 2, "FedFix-0.8": 2}  # ⌈1/Δt⌉
    for spec in paper.RUNS:
        cfg = load_config(PAPERS_DIR / "fedfix" / spec.config, [*spec.overrides, *spec.quick])
        assert cfg.protocol.name == "async"
        assert cfg.run.time_budget == paper.QUICK_BUDGET
        assert cfg.strategy.kwargs.get("server_lr", 1) == (int(spec.label.split()[0][8:]) if "-x" in spec.label else 1)


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


def fake_results(tmp_path, rate: dict[str, float]) -> dict:
    """Metrics folders whose test loss decays at `rate[scheme]` per time unit (same in both scenarios)."""
    results = {}
    for spec in paper.RUNS:
        scheme = spec.label.split()[0]
        folder = tmp_path / spec.label.replace(" ", "_")
        folder.mkdir()
        rows = [{"virtual_time": float(t), "test_loss": 2.0 * 0.5 ** (rate[scheme] * t) + 0.1, "test_accuracy": 0.5,
                 "aggregations": t, "updates": t} for t in range(31)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[spec.label] = [folder]
    return results


@pytest.mark.parametrize("control_rate, supported", [(0.2, True), (1.0, False)])
def test_claim_one_compares_fedfix_with_fedavg_at_its_larger_server_step(tmp_path, control_rate, supported):
    # FedFix beats plain FedAvg either way; the verdict follows FedAvg with server_lr = ⌈1/Δt⌉.
    rate = {s: 0.5 for s in paper.SCHEMES} | {"FedAvg": 0.1} | {c: control_rate for c in paper.CONTROLS}
    claims = paper.report(fake_results(tmp_path, rate), tmp_path)
    assert claims[0].supported is supported
    assert "FedAvg-x5" in claims[0].measured and "F-0" in claims[0].measured
