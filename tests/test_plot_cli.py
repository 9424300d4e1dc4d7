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


def one_line_error(capsys, argv: list[str]) -> str:
    """Runs the CLI; asserts exit 2 and exactly one line on stderr; returns it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedsim: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def fake_run(folder, metrics: bytes | str):
    folder.mkdir(parents=True)
    path = folder / "metrics.jsonl"
    path.write_bytes(metrics) if isinstance(metrics, bytes) else path.write_text(metrics)
    return folder


GOOD = '{"round": 1, "virtual_time": 0.5, "test_accuracy": 0.4}\n{"round": 2, "virtual_time": 1.0, "test_accuracy": 0.6}\n'


def test_plot_label_count_must_match_the_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", GOOD), fake_run(tmp_path / "b", GOOD)
    err = one_line_error(capsys, ["plot", str(a), str(b), "--label", "one", "-o", str(tmp_path / "x.png")])
    assert "1 label(s) for 2 runs" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(a), str(b), "--label", "one", "--label", "two", "-o", str(tmp_path / "x.png")]) == 0


@pytest.mark.parametrize("metrics,words", [
    ('[1, 2]\n' + GOOD, "row 1 is a JSON list"),
    ('"text"\n' + GOOD, "row 1 is a JSON str"),
    (GOOD + '{"round": 3, "virtual_time": "late", "test_accuracy": 0.7}\n', "row 3: virtual_time is 'late'"),
    (GOOD + '{"round": 3, "virtual_time": 2, "test_accuracy": {"a": 1}}\n', "row 3: test_accuracy is"),
    (GOOD + '{"round": 3, "virtual_time": 2, "test_accuracy": true}\n', "row 3: test_accuracy is 'True'"),
    (GOOD + '{"round": 3, "virtual_time": 2, "test_accuracy": 1' + "0" * 400 + '}\n', "row 3: test_accuracy is"),
    ('{"round": 1, "virtual_time": 1' + "0" * 5000 + '}\n' + GOOD, "not a readable metrics file"),
    ("[" * 100_000 + "]" * 100_000 + "\n" + GOOD, "not a readable metrics file"),
    (b"\xff\xfe\x00garbage\n", "not a readable metrics file"),
    ("{not json}\n" + GOOD, "line 1 is not valid JSON"),
])
def test_plot_on_malformed_metrics_is_one_line(tmp_path, capsys, metrics, words):
    run = fake_run(tmp_path / "bad", metrics)
    err = one_line_error(capsys, ["plot", str(run), "-o", str(tmp_path / "x.png")])
    assert str(run / "metrics.jsonl") in err and words in err, err
    assert not (tmp_path / "x.png").exists()


def test_plot_to_an_unwritable_image_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "a", GOOD)
    (tmp_path / "dir.png").mkdir()
    assert "cannot write" in one_line_error(capsys, ["plot", str(run), "-o", str(tmp_path / "dir.png")])
    assert "cannot write" in one_line_error(capsys, ["plot", str(run), "-o", str(tmp_path / "x.unknownformat")])


def test_gallery_takes_paper_names(tmp_path, capsys):
    from fedsim.reproduce import PAPERS_DIR

    assert main(["gallery", "vca", "--docs", str(tmp_path)]) == 0
    page = (tmp_path / "gallery.md").read_text()
    assert "## vca:" in page and "## fedfix:" not in page
    assert sorted(p.name for p in (tmp_path / "gallery").iterdir()) == ["vca"]
    assert main(["gallery", "all", "--docs", str(tmp_path)]) == 0
    shown = {p.name for p in (tmp_path / "gallery").iterdir()}
    assert shown == {p.parent.parent.name for p in PAPERS_DIR.glob("*/results/claims.md")}
    err = one_line_error(capsys, ["gallery", "vcaa", "--docs", str(tmp_path / "other")])
    assert "vcaa: neither a folder nor a paper name" in err and not (tmp_path / "other").exists()


def test_list_with_a_config_lists_its_plugins_components(tmp_path, capsys):
    from .conftest import tutorial_plugin

    import yaml

    cfg = tutorial_plugin("tutorial-strategy.md", tmp_path, "my_fedexp.py")
    (tmp_path / "fedexp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["list", "strategies", str(tmp_path / "fedexp.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fedexp" in out and "fedavg" in out
    assert main(["list", str(tmp_path / "fedexp.yaml")]) == 0
    assert "fedexp" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("plugins: [missing_plugin.py]\n")
    assert "plugin file not found" in one_line_error(capsys, ["list", "strategies", str(tmp_path / "bad.yaml")])
