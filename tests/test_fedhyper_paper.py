"""experiments/papers/fedhyper: every grid cell is a valid config, and the report reads its numbers from the runs."""
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
    assert len(paper.RUNS) == len(paper.METHODS) * 25
    for spec in paper.RUNS:
        if spec.overrides[-2] == "strategy.server_lr=0.5" or spec.quick_seeds is None:  # GM/FULL's low-η_g edge
            cfg = load_config(PAPERS_DIR / "fedhyper" / spec.config, spec.overrides)
            cfg.strategy.build()


def fake_runs(tmp: Path, better: bool) -> dict[str, list[Path]]:
    """Metrics folders for the quick cells: FedHyper variants learn faster than FedAvg if `better`."""
    results = {}
    for spec in (s for s in paper.RUNS if s.quick_seeds is None):
        method, g, l = paper.CELLS[spec.label]
        speed = l * g * (3.0 if (method != "FedAvg") == better else 1.0)
        acc = 0.95 * (1 - np.exp(-speed * 20 * np.arange(51)))
        folder = tmp / spec.label.replace(" ", "_")
        folder.mkdir(parents=True)
        rows = [{"round": r, "test_accuracy": float(a), "global_lr": g, "local_lr": l} for r, a in enumerate(acc)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[spec.label] = [folder]
    return results


@pytest.mark.parametrize("better", [True, False])
def test_report_claims_follow_the_runs(tmp_path, better):
    claims = paper.report(fake_runs(tmp_path / "runs", better), tmp_path)
    assert (tmp_path / "fedhyper_final_accuracy.png").is_file()
    assert (tmp_path / "fedhyper_rounds_to_target.png").is_file()
    speed, gain, spread = claims[0], claims[1], claims[2]
    assert speed.supported is better and gain.supported is better and spread.supported is better
    assert "FedAvg" in speed.measured and "G-code" in gain.measured
