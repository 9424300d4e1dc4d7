"""experiments/papers/momentum: every run is a valid config, and the claims follow the runs' numbers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.reproduce import PAPERS_DIR, load_paper

paper = load_paper("momentum")


def test_every_run_is_a_valid_config():
    for spec in paper.RUNS:
        for overrides in (spec.overrides, [*spec.overrides, *spec.quick]):
            cfg = load_config(PAPERS_DIR / "momentum" / spec.config, overrides)
            cfg.strategy.build()
            cfg.protocol.build()


def fake_runs(tmp: Path, momentum_wins: bool, seeds: int = 2) -> dict[str, list[Path]]:
    """Metrics folders where every momentum variant is better (or worse) than its baseline."""
    rounds = np.arange(0, 101, 5)
    results: dict[str, list[Path]] = {}
    for spec in paper.RUNS:
        with_momentum = "-M" in spec.label
        good = with_momentum == momentum_wins
        for seed in range(seeds):
            speed = (0.08 if good else 0.04) + 0.001 * seed
            if "VR" in spec.label:  # the VR claims compare VR with its -M form: VR must differ from it
                speed = 0.12 if momentum_wins else 0.02
            acc = 0.95 * (1 - np.exp(-speed * rounds))
            dist = 3.0 * np.exp(-speed * rounds) + (0.01 if speed > 0.06 else 0.1)
            folder = tmp / f"{spec.label}-{seed}".replace(" ", "_").replace(",", "")
            folder.mkdir(parents=True)
            rows = [{"round": int(r), "test_accuracy": float(a), "test_loss": float(1 - a), "dist_to_opt": float(d),
                     **({"momentum_norm": float(speed * d)} if with_momentum and r > 0 else {})}
                    for r, a, d in zip(rounds, acc, dist)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            results.setdefault(spec.label, []).append(folder)
    return results


@pytest.mark.parametrize("momentum_wins", [True, False])
def test_report_claims_follow_the_runs(tmp_path, momentum_wins):
    claims = paper.report(fake_runs(tmp_path / "runs", momentum_wins), tmp_path)
    assert (tmp_path / "momentum.png").is_file()
    assert len(claims) == 6
    assert all(c.supported is momentum_wins for c in claims), [(c.claim, c.supported) for c in claims]
    assert "FedAvg" in claims[1].measured and "SCAFFOLD" in claims[2].measured
    assert "could not be read" in claims[4].claim and "could not be read" in claims[5].claim
    assert "η = 0.01" in claims[5].measured and "largest ‖ηg‖" in claims[5].measured
