"""experiments/papers/fedhyper: every grid cell is a valid config, the β_h tuning uses seeds the
evaluation does not, and the report reads its numbers (and verdicts) from the runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.reproduce import PAPERS_DIR, load_paper

paper = load_paper("fedhyper")


def test_every_cell_is_a_valid_config_and_quick_mode_runs_the_small_grid():
    quick = [s for s in paper.RUNS if s.quick_seeds is None]
    assert len(quick) == len(paper.QUICK_METHODS) * 3 * 3
    assert len(paper.RUNS) == len(paper.METHODS) * 25 + len(paper.TUNED) * len(paper.TUNE_BETAS) * 3 * 3
    for spec in paper.RUNS:
        if "strategy.server_lr=0.5" in spec.overrides or spec.quick_seeds is None:  # GM/FULL's low-η_g edge
            cfg = load_config(PAPERS_DIR / "fedhyper" / spec.config, spec.overrides)
            cfg.strategy.build()


def test_tuning_runs_use_only_seeds_the_evaluation_does_not():
    assert not set(paper.TUNE_SEEDS) & set(paper.SEEDS)
    for spec in paper.RUNS:
        tuning = spec.label in paper.TUNING
        assert tuple(spec.seeds) == (paper.TUNE_SEEDS if tuning else paper.SEEDS)
        if tuning:
            assert spec.quick_seeds == ()


def write_run(folder: Path, acc: np.ndarray, g: float, l: float) -> Path:
    folder.mkdir(parents=True)
    rows = [{"round": r, "test_accuracy": float(a), "global_lr": g, "local_lr": l} for r, a in enumerate(acc)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def fake_runs(tmp: Path, better: bool) -> dict[str, list[Path]]:
    """Metrics folders for the quick cells: every FedHyper method learns faster and plateaus
    10 points higher than FedAvg if `better`, the reverse otherwise."""
    results = {}
    for spec in (s for s in paper.RUNS if s.quick_seeds is None):
        method, g, l = paper.CELLS[spec.label]
        good = (method != "FedAvg") == better
        acc = (0.95 if good else 0.85) * (1 - np.exp(-l * g * 20 * (3.0 if good else 1.0) * np.arange(51)))
        results[spec.label] = [write_run(tmp / spec.label.replace(" ", "_"), acc, g, l)]
    return results


@pytest.mark.parametrize("better", [True, False])
def test_report_claims_follow_the_runs(tmp_path, better):
    claims = paper.report(fake_runs(tmp_path / "runs", better), tmp_path)
    assert (tmp_path / "fedhyper_final_accuracy.png").is_file()
    assert (tmp_path / "fedhyper_rounds_to_target.png").is_file()
    assert len(claims) == 7  # speed, gain, spread × (released, variants); tuning (FedAvgM is not in quick mode)
    assert [c.supported for c in claims[:6]] == [better] * 6
    assert ["as released" in c.claim for c in claims[:6]] == [True, False] * 3
    assert "G-code" in claims[0].measured and "FULL-code" in claims[2].measured and "SL" in claims[3].measured
    assert "where FedAvg has converged" in claims[2].claim and "has not converged" in claims[2].measured
    assert claims[6].supported is None and "no tuning runs" in claims[6].measured


def test_plateau_rule_ignores_cells_where_fedavg_is_still_climbing(tmp_path):
    # FedHyper gains 30 points only where FedAvg has not converged: the claim is not supported.
    results = fake_runs(tmp_path / "runs", better=False)
    for label, (method, g, l) in paper.CELLS.items():
        if label in results and method != "FedAvg":
            slow = np.linspace(0.1, 0.5, 51) if l == 0.001 else np.full(51, 0.9)  # FedAvg: climbing / flat
            fast = np.full(51, 0.8 if l == 0.001 else 0.9)
            slow[0] = fast[0] = 0.1  # round 0: the initial model
            results[label] = [write_run(tmp_path / "h" / label.replace(" ", "_"), fast, g, l)]
            fedavg = f"FedAvg g={g} l={l}"
            results[fedavg] = [write_run(tmp_path / "f" / label.replace(" ", "_"), slow, g, l)]
    claims = paper.report(results, tmp_path)
    assert claims[2].supported is False and claims[3].supported is False
    assert "+30.0" in claims[2].measured  # reported, but as a gain where FedAvg has not converged


def test_beta_pick_reads_only_the_tuning_runs(tmp_path):
    results = {}
    for label, (m, b, g, l) in paper.TUNING.items():
        acc = np.full(51, 0.9 if b == 0.5 else 0.5)
        results[label] = [write_run(tmp_path / label.replace(" ", "_"), acc, g, l)]
    picks = paper.pick_betas(results)
    assert {m: b for m, (b, _) in picks.items()} == {m: 0.5 for m in paper.TUNED}
    assert picks["G"][1] == {0.1: 0.5, 0.3: 0.5, 0.5: pytest.approx(0.9)}
