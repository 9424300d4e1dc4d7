"""`fedsim reproduce` and `fedsim gallery` on a toy paper folder: runs, figure, claims.md, gallery page."""
from __future__ import annotations

import csv
import json
import statistics
import subprocess
import textwrap

import pytest
import yaml

from fedsim.errors import FedsimError
from fedsim.gallery import build
from fedsim.outputs import read_jsonl
from fedsim.reproduce import available, reproduce, seed_final, seed_mean

from .conftest import ROOT, fedsim_cmd, quadratic_config

TOY = '''
"""A toy paper: FedAvg with server lr 1 vs 0.5 on the quadratic."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedsim.outputs import read_jsonl
from fedsim.reproduce import Claim, RunSpec

TITLE = "Toy paper: a larger server step converges faster"
FULL_RUNTIME = "a few seconds"
RUNS = [
    RunSpec("lr 1", "quad.yaml", ["strategy.server_lr=1.0"], seeds=(0, 1), quick=["run.rounds=2"]),
    RunSpec("lr 0.5", "quad.yaml", ["strategy.server_lr=0.5"], seeds=(0, 1), quick=["run.rounds=2"]),
]


def final(folders):
    return sum(read_jsonl(f / "metrics.jsonl")[-1]["dist_to_opt"] for f in folders) / len(folders)


def report(results, out: Path):
    fig, ax = plt.subplots()
    for label, folders in results.items():
        rows = read_jsonl(folders[0] / "metrics.jsonl")
        ax.plot([r["round"] for r in rows], [r["dist_to_opt"] for r in rows], label=label)
    fig.savefig(out / "toy.png", dpi=40)
    plt.close(fig)
    a, b = final(results["lr 1"]), final(results["lr 0.5"])
    return [Claim("A larger server step converges faster", f"final distance {a:.6f} vs {b:.6f}", a < b)]
'''


@pytest.fixture(scope="module")
def papers(tmp_path_factory):
    root = tmp_path_factory.mktemp("papers")
    (root / "toy").mkdir()
    (root / "toy" / "reproduce.py").write_text(TOY)
    cfg = quadratic_config(run={"rounds": 3, "eval_every": 1})
    (root / "toy" / "quad.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def quick(papers, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    return reproduce("toy", out, quick=True, progress=lambda s: None, papers_dir=papers)


def final_distance(folder):
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["dist_to_opt"]


def test_quick_mode_writes_runs_figure_and_claims(quick):
    out = quick.out
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["lr_0.5-seed0", "lr_1-seed0"]  # quick: the first seed only, quick overrides applied
    assert json.loads((out / "runs" / "lr_1-seed0" / "summary.json").read_text())["rounds"] == 2
    assert quick.figures == [out / "toy.png"]
    a, b = final_distance(out / "runs" / "lr_1-seed0"), final_distance(out / "runs" / "lr_0.5-seed0")
    text = (out / "claims.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Toy paper: a larger server step converges faster"
    assert lines[2].startswith("Mode: quick; run time ") and "CPU time" in lines[2]
    assert lines[3] == "Runs: 2 runs: 2 curves, seeds 0 (1 per curve); executor: serial.  "
    assert lines[4] == "Regenerate: `fedsim reproduce toy --quick --out DIR` (full mode: a few seconds)."
    assert "![toy](toy.png)" in lines
    # the measured numbers come from the runs' metrics
    assert f"| A larger server step converges faster | final distance {a:.6f} vs {b:.6f} | " \
           f"{'yes' if a < b else '**no**'} |" in lines


def test_full_mode_runs_every_seed(papers, tmp_path):
    result = reproduce("toy", tmp_path, progress=lambda s: None, papers_dir=papers)
    assert len(list((tmp_path / "runs").iterdir())) == 4
    text = (tmp_path / "claims.md").read_text()
    assert "Runs: 4 runs: 2 curves, seeds 0, 1 (2 per curve); executor: serial." in text
    assert "Regenerate: `fedsim reproduce toy --out DIR`." in text
    assert result.claims[0].supported is True  # server lr 1 beats 0.5 on this quadratic in 3 rounds
    # the sweep machinery's tables: a row per run, then mean ± std over each curve's seeds
    with (tmp_path / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    finals = {(r["curve"], int(r["seed"])): float(r["dist_to_opt"]) for r in rows}
    assert finals == {(label, seed): final_distance(tmp_path / "runs" / f"{label.replace(' ', '_')}-seed{seed}")
                      for label in ("lr 1", "lr 0.5") for seed in (0, 1)}
    with (tmp_path / "summary.csv").open() as fh:
        summary = {r["curve"]: r for r in csv.DictReader(fh)}
    for label in ("lr 1", "lr 0.5"):
        pair = [finals[(label, 0)], finals[(label, 1)]]
        assert summary[label]["n"] == "2"
        assert float(summary[label]["dist_to_opt_mean"]) == pytest.approx(statistics.fmean(pair))
        assert float(summary[label]["dist_to_opt_std"]) == pytest.approx(statistics.stdev(pair))
    mean, std = seed_final([tmp_path / "runs" / f"lr_1-seed{seed}" for seed in (0, 1)], "dist_to_opt")
    assert (mean, std) == (float(summary["lr 1"]["dist_to_opt_mean"]), float(summary["lr 1"]["dist_to_opt_std"]))
    # a curve's seed mean and std, as the papers' figures draw them
    folders = [tmp_path / "runs" / f"lr_1-seed{seed}" for seed in (0, 1)]
    rounds, mean, std = seed_mean(folders, "round", "dist_to_opt")
    curves = [[r["dist_to_opt"] for r in read_jsonl(f / "metrics.jsonl")] for f in folders]
    assert list(rounds) == [0, 1, 2, 3] and mean[-1] == pytest.approx(statistics.fmean(pair := [c[-1] for c in curves]))
    assert std[-1] == pytest.approx(statistics.stdev(pair))


def test_executor_option_reaches_every_run(papers, tmp_path):
    reproduce("toy", tmp_path, quick=True, executor="vmap", progress=lambda s: None, papers_dir=papers)
    for run in (tmp_path / "runs").iterdir():
        assert yaml.safe_load((run / "config.yaml").read_text())["executor"]["kind"] == "vmap"
    assert "executor: vmap" in (tmp_path / "claims.md").read_text()
    assert "`fedsim reproduce toy --quick --executor vmap --out DIR`" in (tmp_path / "claims.md").read_text()


def test_unknown_executor_or_paper_stops_before_running(papers, tmp_path):
    with pytest.raises(FedsimError, match="unknown executor 'vmapp'.*serial"):
        reproduce("toy", tmp_path / "a", executor="vmapp", papers_dir=papers)
    assert not (tmp_path / "a").exists()
    proc = subprocess.run(fedsim_cmd("reproduce", "momentm", "--quick", "--out", str(tmp_path / "b")),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean 'momentum'" in proc.stderr and not (tmp_path / "b").exists()
    proc = subprocess.run(fedsim_cmd("reproduce", "all", "--executor", "vmapp", "--out", str(tmp_path / "c")),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown executor 'vmapp'" in proc.stderr and not (tmp_path / "c").exists()


def test_gallery_is_written_from_claims(quick, papers, tmp_path):
    from PIL import Image

    page = build([quick.out], tmp_path / "docs", "fedsim gallery OUT", papers_dir=papers)
    text = page.read_text()
    claims = (quick.out / "claims.md").read_text().splitlines()
    table = [line for line in claims if line.startswith("|")]
    assert all(line in text.splitlines() for line in table)  # the claim table, verbatim
    assert "![toy](gallery/toy/toy.png)" in text
    assert "**Quick mode**, 2 runs: 2 curves, seeds 0 (1 per curve), executor serial" in text
    assert "Regenerate: `fedsim reproduce toy --quick --out DIR`" in text
    assert "Full mode: a few seconds." in text
    assert "    fedsim gallery OUT" in text.splitlines()
    with Image.open(tmp_path / "docs" / "gallery" / "toy" / "toy.png") as im:
        assert im.mode == "P"  # copied as a palette PNG


def test_gallery_reads_an_older_claims_file_in_a_paper_folder(quick, papers, tmp_path):
    results = papers / "toy" / "results"  # an older claims.md: no Runs or Regenerate line
    results.mkdir(exist_ok=True)
    (results / "toy.png").write_bytes((quick.out / "toy.png").read_bytes())
    (results / "claims.md").write_text(textwrap.dedent("""\
        # Toy paper, measured earlier

        Mode: full; run time 12 s.

        ![toy](toy.png)

        | claim | measured | supported |
        |---|---|---|
        | A claim | 1.0 | yes |
        """))
    text = build([results], tmp_path / "docs", "g", papers_dir=papers).read_text()
    assert "**Full mode**, 4 runs: 2 curves, seeds 0, 1 (2 per curve), executor serial; run time 12 s." in text
    assert "| A claim | 1.0 | yes |" in text
    with pytest.raises(FedsimError, match="more than one reproduction of toy"):
        build([results, quick.out], tmp_path / "docs2", "g", papers_dir=papers)
    with pytest.raises(FedsimError, match="no claims.md"):
        build([tmp_path / "docs"], tmp_path / "docs3", "g", papers_dir=papers)


@pytest.mark.slow  # starts a local Ray: ~30 s on 2 shared cores
def test_ray_executor_shares_one_ray_and_gives_the_serial_claims(papers, quick, tmp_path):
    ray = pytest.importorskip("ray")
    result = reproduce("toy", tmp_path, quick=True, executor="ray", progress=lambda s: None, papers_dir=papers)
    assert not ray.is_initialized()  # the shared Ray was stopped at the end
    assert [c.measured for c in result.claims] == [c.measured for c in quick.claims]


@pytest.mark.parametrize("name", available())
def test_every_paper_states_its_runtime_and_its_configs_load(name):
    from fedsim.config import load_config
    from fedsim.reproduce import PAPERS_DIR, load_paper, plan

    paper = load_paper(name)
    assert paper.TITLE and paper.FULL_RUNTIME and callable(paper.report)
    assert 0 < len(plan(paper, quick=True)) <= len(plan(paper, quick=False))
    for quick in (True, False):  # each config file is valid in both modes (validation only, nothing runs;
        for spec in {s.config: s for s in paper.RUNS}.values():  # the papers' own tests check every curve)
            load_config(PAPERS_DIR / name / spec.config, [*spec.overrides, *(spec.quick if quick else ())])


def test_docs_gallery_is_generated_from_the_papers_results(tmp_path):
    """docs/gallery.md is exactly what `fedsim gallery experiments/papers/*/results` writes now."""
    from fedsim.reproduce import PAPERS_DIR

    sources = sorted(PAPERS_DIR.glob("*/results"))
    invocation = "fedsim gallery " + " ".join(p.relative_to(ROOT).as_posix() for p in sources)
    page = build(sources, tmp_path, invocation)
    assert (ROOT / "docs" / "gallery.md").read_text() == page.read_text(), \
        f"docs/gallery.md is out of date: run `{invocation}` from the repository root"
    shipped = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs" / "gallery").rglob("*.png"))
    assert shipped == sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "gallery").rglob("*.png"))


def test_set_overrides_reach_every_run_and_the_regenerate_line(papers, tmp_path):
    reproduce("toy", tmp_path, quick=True, executor="vmap", progress=lambda s: None, papers_dir=papers,
              settings=["executor.device=cpu", "ray.address=auto"])
    for run in (tmp_path / "runs").iterdir():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["executor"]["device"] == "cpu" and cfg["ray"]["address"] == "auto"
    text = (tmp_path / "claims.md").read_text()
    assert "executor: vmap; overrides: executor.device=cpu, ray.address=auto." in text
    assert "`fedsim reproduce toy --quick --executor vmap --set executor.device=cpu --set ray.address=auto --out DIR`" in text


def test_bad_set_overrides_stop_before_running(papers, tmp_path):
    with pytest.raises(FedsimError, match="--set: expected KEY=VALUE"):
        reproduce("toy", tmp_path / "a", quick=True, papers_dir=papers, settings=["executor.device"])
    proc = subprocess.run(fedsim_cmd("reproduce", "momentum", "--quick", "--set", "executor.devize=cpu",
                                     "--out", str(tmp_path / "b")), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "executor.devize" in proc.stderr and not (tmp_path / "b").exists()


def test_gallery_never_runs_code_from_a_path_a_claims_file_names(quick, papers, tmp_path):
    marker = tmp_path / "marker.txt"
    evil = papers.parent / "evil"  # a reproduce.py next to the papers folder, reached by `..`
    evil.mkdir(exist_ok=True)
    (evil / "reproduce.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nRUNS = []\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "toy.png").write_bytes((quick.out / "toy.png").read_bytes())
    claims = (quick.out / "claims.md").read_text()
    (src / "claims.md").write_text(claims.replace("fedsim reproduce toy", "fedsim reproduce ../evil"))
    with pytest.raises(FedsimError, match="Regenerate line names '../evil', which is not one of fedsim's papers"):
        build([src], tmp_path / "docs", "g", papers_dir=papers)
    assert not marker.exists()
    with pytest.raises(FedsimError, match="unknown paper '../evil'"):
        reproduce("../evil", tmp_path / "out", papers_dir=papers)
    assert not marker.exists()
    # a figure is copied only from the reproduction's own folder
    (src / "claims.md").write_text(claims.replace("![toy](toy.png)", f"![toy](../{quick.out.name}/toy.png)"))
    with pytest.raises(FedsimError, match="outside its folder"):
        build([src], tmp_path / "docs", "g", papers_dir=papers)


def test_gallery_deletes_only_the_figures_it_writes(quick, papers, tmp_path):
    docs = tmp_path / "docs"
    (docs / "gallery" / "old").mkdir(parents=True)
    (docs / "gallery" / "old" / "stale.png").write_bytes(b"png")
    (docs / "gallery" / "README.txt").write_text("the user's")
    (docs / "gallery" / "notes").mkdir()
    (docs / "gallery" / "notes" / "draft.md").write_text("the user's")
    build([quick.out], docs, "g", papers_dir=papers)
    assert not (docs / "gallery" / "old" / "stale.png").exists() and (docs / "gallery" / "toy" / "toy.png").is_file()
    assert (docs / "gallery" / "README.txt").read_text() == (docs / "gallery" / "notes" / "draft.md").read_text()
