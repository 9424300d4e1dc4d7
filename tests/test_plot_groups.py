"""`fedsim plot` groups runs into curves (by --group-by, or all but the seed) with mean ± std bands."""
from __future__ import annotations

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.plots import group_runs, mean_std, run_config as read_config, run_metrics

from .conftest import quadratic_config, run_config


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A folder of four run folders: local.lr 0.05 and 0.08, seeds 0 and 1 (as a sweep makes them)."""
    root = tmp_path_factory.mktemp("runs")
    for lr in ("0.05", "0.08"):
        for seed in (0, 1):
            run_config(quadratic_config(run={"rounds": 20, "eval_every": 5}), root / f"lr{lr}-s{seed}",
                       overrides=(f"local.lr={lr}", f"seed={seed}"))
    return root


def loaded(root):
    return [(p, run_metrics(p, "round", "dist_to_opt"), read_config(p)) for p in sorted(root.iterdir())]


def test_runs_that_differ_only_in_the_seed_form_one_curve(sweep_dir):
    groups = group_runs(loaded(sweep_dir), None)
    assert [g.label for g in groups] == ["local.lr=0.05", "local.lr=0.08"]
    assert [[p.name for p, _, _ in g.runs] for g in groups] == [["lr0.05-s0", "lr0.05-s1"], ["lr0.08-s0", "lr0.08-s1"]]
    by_seed = group_runs(loaded(sweep_dir), ["seed"])
    assert [g.label for g in by_seed] == ["seed=0", "seed=1"]


def test_the_band_is_the_mean_and_sample_std_over_seeds(sweep_dir):
    (_, a, _), (_, b, _) = loaded(sweep_dir)[:2]
    ya, yb = [r["dist_to_opt"] for r in a], [r["dist_to_opt"] for r in b]
    grid, mean, std = mean_std([([r["round"] for r in a], ya), ([r["round"] for r in b], yb)])
    assert grid.tolist() == [0, 5, 10, 15, 20]
    assert np.allclose(mean, (np.array(ya) + np.array(yb)) / 2)
    assert np.allclose(std, np.abs(np.array(ya) - np.array(yb)) / np.sqrt(2))
    grid, mean, _ = mean_std([([0, 2, 4], [0, 2, 4]), ([1, 3, 5], [10, 30, 50])])  # different x: interpolated
    assert grid.tolist() == [1, 2, 3, 4] and np.allclose(mean, [(1 + 10) / 2, (2 + 20) / 2, (3 + 30) / 2, (4 + 40) / 2])


def test_cli_draws_bands_in_the_format_of_the_extension(sweep_dir, tmp_path):
    svg = tmp_path / "f.svg"
    assert main(["plot", str(sweep_dir), "--x", "round", "--y", "dist_to_opt", "-o", str(svg)]) == 0
    text = svg.read_text()
    for words in ("local.lr=0.05 (n=2)", "local.lr=0.08 (n=2)", "rounds", "distance to optimum (L2)",
                  "mean ± std over seeds", ">quad<"):
        assert words in text, words
    assert text.count("fill-opacity: 0.2") == 2  # one band per curve
    pdf, png = tmp_path / "f.pdf", tmp_path / "f.png"
    assert main(["plot", str(sweep_dir), "--group-by", "seed", "-o", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert main(["plot", str(sweep_dir / "lr0.05-s0"), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unknown_group_key_is_one_line(sweep_dir, tmp_path, capsys):
    assert main(["plot", str(sweep_dir), "--group-by", "local.lrr", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fedsim: error: --group-by: no run's config has 'local.lrr'; did you mean 'local.lr'?"
