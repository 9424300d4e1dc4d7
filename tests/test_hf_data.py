"""The 'hf' source on tiny Hugging Face datasets the tests write with save_to_disk and
to_parquet: images, features, token ids, users; refused corruptions; a CLI run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.data.base import SourceContext
from fedsim.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets")
from fedsim.data.hf import hf  # noqa: E402 - after the skip: the source module itself needs no datasets

CTX = SourceContext(num_clients=2, seed=0, test_fraction=0.25)


@pytest.fixture(autouse=True)
def quiet_datasets():
    datasets.disable_progress_bars()


def image_set(n=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"]),
                                  "user": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(n)],
                                     "user": [f"u{i // 2}" for i in range(n)]}, features=features)
    return ds, pixels


def test_save_to_disk_images_are_decoded_resized_with_users_and_the_test_split(tmp_path):
    ds, pixels = image_set()
    datasets.DatasetDict(train=ds, test=ds.select([0, 1, 2])).save_to_disk(tmp_path / "dd")
    listing = lambda: sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "dd").rglob("*"))  # noqa: E731
    before = listing()
    src = hf(CTX, path=str(tmp_path / "dd"), inputs=["img"], size=[6, 5], user_column="user")
    assert listing() == before  # nothing written next to the data (no datasets cache files)
    assert src.x_train.shape == (8, 3, 6, 5) and src.x_test.shape == (3, 3, 6, 5)
    assert np.allclose(src.x_train[3].numpy(), pixels[3].transpose(2, 0, 1) / 255.0)  # same size: no resampling
    assert src.num_classes == 3 and src.info["classes"] == ["x", "y", "z"]
    assert src.y_train.tolist() == [i % 3 for i in range(8)]
    assert [len(g) for g in src.groups] == [2, 2, 2, 2] and [len(g) for g in src.test_groups] == [2, 1, 0, 0]


def test_parquet_images_in_gray_hold_out_a_stratified_test_fraction(tmp_path):
    ds, _ = image_set()
    ds.to_parquet(tmp_path / "d.parquet")
    src = hf(CTX, path=str(tmp_path / "d.parquet"), inputs=["img"], size=[4, 4], color="gray")
    assert src.x_train.shape[1:] == (1, 4, 4) and len(src.y_train) + len(src.y_test) == 8 and len(src.y_test) == 2
    assert src.groups is None and src.num_classes == 3


def test_tabular_columns_side_by_side_token_ids_stay_integer_and_names_are_numbered(tmp_path):
    ds = datasets.Dataset.from_dict({"a": [1.0, 2, 3, 4], "b": [[1, 2], [3, 4], [5, 6], [7, 8]],
                                     "tok": [[1, 2, 3]] * 4, "lab": ["v", "u", "v", "u"]})
    ds.to_parquet(tmp_path / "t.parquet")
    ctx = SourceContext(num_clients=2, seed=0, test_fraction=0.0)
    src = hf(ctx, path=str(tmp_path / "t.parquet"), inputs=["a", "b"], label_column="lab", test_path=str(tmp_path / "t.parquet"))
    assert src.x_train.tolist()[1] == [2.0, 3.0, 4.0] and src.y_train.tolist() == [1, 0, 1, 0]
    assert src.info["classes"] == ["u", "v"]
    tokens = hf(ctx, path=str(tmp_path / "t.parquet"), inputs=["tok"], label_column="lab", test_path=str(tmp_path / "t.parquet"))
    assert str(tokens.x_train.dtype) == "torch.int64" and tokens.x_train.shape == (4, 3)


def write_table(path, **columns):
    datasets.Dataset.from_dict(columns).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("missing folder", r"nope does not exist \(data.path\)"),
    ("missing column", r"t.parquet: no column 'zz' \(data.inputs; has a, lab\)"),
    ("float labels", r"column 'a' \(data.label_column\) holds float64"),
    ("text input", r"column 'lab' \(data.inputs\) holds text"),
    ("ragged rows", r"column 'r' \(data.inputs\) has rows of different lengths"),
    ("missing split", r"dd: no split 'tr' \(data.train_split; has train\)"),
    ("not a dataset folder", r"empty \(data.path\): not a folder written by save_to_disk"),
])
def test_corruptions_are_refused_on_one_line_naming_the_key(tmp_path, case, match):
    table = write_table(tmp_path / "t.parquet", a=[1.0, 2.0], lab=["p", "q"])
    kwargs = {
        "missing folder": dict(path=str(tmp_path / "nope")),
        "missing column": dict(path=table, inputs=["zz"], label_column="lab"),
        "float labels": dict(path=table, inputs=["a"], label_column="a"),
        "text input": dict(path=table, inputs=["lab"], label_column="lab"),
        "ragged rows": dict(path=write_table(tmp_path / "r.parquet", r=[[1], [1, 2]], y=[0, 1]), inputs=["r"],
                            label_column="y"),
        "missing split": dict(path=str(tmp_path / "dd"), train_split="tr"),
        "not a dataset folder": dict(path=str(tmp_path / "empty")),
    }[case]
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"a": [1.0]})).save_to_disk(tmp_path / "dd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=match) as info:
        hf(CTX, **kwargs)
    assert len(str(info.value).splitlines()) == 1


def test_without_the_package_the_error_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match=r"data.name: .*pip install 'fedsim\[hf\]'"):
        hf(CTX, path="anything")


def test_cli_runs_natural_clients_from_a_user_column(tmp_path, tmp_yaml, capsys):
    from fedsim.cli import main

    from .conftest import digits_config

    ds, _ = image_set()
    datasets.DatasetDict(train=ds, test=ds.select([0, 2, 4, 6])).save_to_disk(tmp_path / "dd")
    data = {"name": "hf", "path": str(tmp_path / "dd"), "inputs": ["img"], "user_column": "user", "size": [4, 4],
            "num_clients": "all", "partition": "natural"}
    cfg = tmp_yaml({**digits_config(run={"rounds": 1, "eval_every": 1}), "data": data,
                    "model": {"name": "mlp", "hidden": [4]}, "protocol": {"name": "sync", "clients_per_round": 2}})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_accuracy"] >= 0 and "client_acc_mean" in rows[-1]
