"""npz, CSV, Fashion-MNIST/KMNIST/EMNIST idx, CIFAR-100 and image-folder sources on tiny files
the tests write in each real format: decoding, users, refused corruptions, a CLI run on each;
and the bundled digits, read from scikit-learn's file without importing it."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fedsim.data.arrays import csv_table, npz
from fedsim.data.base import SourceContext
from fedsim.data.folders import cifar100, emnist, fashion_mnist, kmnist
from fedsim.data.image_folder import image_folder
from fedsim.errors import DataError

from .conftest import ROOT, digits_config
from .test_folders import idx_bytes, write_mnist

CTX = SourceContext(num_clients=2, seed=0, test_fraction=0.25)


# ------------------------------------------------------------------ npz and CSV
def write_npz(path, n=24, users=True, test=False):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": np.arange(n) % 3}
    if users:
        arrays["user"] = np.array(["b", "a", "c"] * (n // 3))
    if test:
        arrays.update(x_test=rng.normal(size=(6, 3)), y_test=np.arange(6) % 3, user_test=np.array(["a", "c"] * 3))
    np.savez(path, **arrays)
    return arrays


def test_npz_users_become_groups_in_order_of_first_appearance_with_their_own_test_rows(tmp_path):
    a = write_npz(tmp_path / "d.npz", test=True)
    src = npz(CTX, path=str(tmp_path / "d.npz"), user_key="user")
    assert src.num_classes == 3 and len(src.y_train) == 24 and len(src.y_test) == 6
    assert [len(g) for g in src.groups] == [8, 8, 8]
    assert (src.x_train[src.groups[1]].numpy() == a["x"][a["user"] == "a"]).all()  # 'b' first, then 'a'
    assert [len(g) for g in src.test_groups] == [0, 3, 3]


def test_npz_without_test_arrays_holds_out_a_fraction_of_each_user(tmp_path):
    write_npz(tmp_path / "d.npz")
    src = npz(CTX, path=str(tmp_path / "d.npz"), user_key="user")
    assert [len(g) for g in src.groups] == [6, 6, 6] and [len(g) for g in src.test_groups] == [2, 2, 2]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 2])}, "'y' must hold integer class ids"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "3 inputs, 2 labels"),
    ({"x": np.zeros((3, 2)), "z": np.array([0, 1, 1])}, "no array 'y' \\(has x, z\\)"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, 1, 1], dtype=object)}, "object arrays"),
])
def test_bad_npz_is_refused_naming_the_file(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match) as info:
        npz(CTX, path=str(tmp_path / "d.npz"))
    assert "d.npz" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_not_an_npz_is_refused(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(DataError, match="d.npz: not a .npz file"):
        npz(CTX, path=str(tmp_path / "d.npz"))


def write_csv(path, rows=12, bad=None):
    lines = ["f1,f2,species,user"] + [f"{i * 0.5},{i % 4},{'cat' if i % 2 else 'dog'},u{i % 3}" for i in range(rows)]
    if bad is not None:
        lines[3] = bad
    path.write_text("\n".join(lines) + "\n")


def test_csv_numbers_string_classes_in_sorted_order_and_groups_users(tmp_path):
    write_csv(tmp_path / "t.csv")
    src = csv_table(CTX, path=str(tmp_path / "t.csv"), label_column="species", user_column="user")
    assert src.info["classes"] == ["cat", "dog"] and src.info["features"] == ["f1", "f2"]
    assert len(src.groups) == 3 and len(src.y_train) + len(src.y_test) == 12
    x_all = np.concatenate([src.x_train.numpy(), src.x_test.numpy()])
    assert sorted(x_all[:, 0].tolist()) == [i * 0.5 for i in range(12)]
    row = src.x_train[0].numpy()
    assert src.y_train[0] == (0 if int(row[0] * 2) % 2 else 1)


@pytest.mark.parametrize("bad, match", [
    ("1.0,x,cat,u1", "t.csv, line 4: column 'f2' is 'x', not a number"),
    ("1.0,2,cat", "t.csv, line 4: 3 fields, the header has 4"),
])
def test_bad_csv_rows_are_refused_naming_file_and_line(tmp_path, bad, match):
    write_csv(tmp_path / "t.csv", bad=bad)
    with pytest.raises(DataError, match=match):
        csv_table(CTX, path=str(tmp_path / "t.csv"), label_column="species", user_column="user")


def test_csv_missing_label_column_names_the_expected_layout(tmp_path):
    write_csv(tmp_path / "t.csv")
    with pytest.raises(DataError, match="no column 'label' in the header .*a header row"):
        csv_table(CTX, path=str(tmp_path / "t.csv"))


# ------------------------------------------------------------------ idx and CIFAR-100
@pytest.mark.parametrize("reader, name", [(fashion_mnist, "FashionMNIST"), (kmnist, "KMNIST")])
def test_mnist_like_sets_in_torchvisions_layout(tmp_path, reader, name):
    files = write_mnist(tmp_path / "root" / name / "raw", gz=True)
    src = reader(CTX, root=str(tmp_path / "root"))
    assert np.array_equal(src.y_train.numpy(), files["train-labels-idx1-ubyte"]) and src.num_classes == 10
    with pytest.raises(DataError, match=f"missing train-images-idx3-ubyte .*{name}/raw"):
        reader(CTX, root=str(tmp_path))


def write_emnist(folder, split="letters", n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    images = {s: rng.integers(0, 256, (n, 28, 28)) for s in ("train", "test")}
    for s in ("train", "test"):
        (folder / f"emnist-{split}-{s}-images-idx3-ubyte").write_bytes(idx_bytes(images[s]))
        (folder / f"emnist-{split}-{s}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(1, n + 1)))
    return images


def test_emnist_is_transposed_as_torchvision_does_and_checks_its_classes(tmp_path):
    images = write_emnist(tmp_path / "EMNIST" / "raw")
    src = emnist(CTX, root=str(tmp_path), split="letters")
    assert src.num_classes == 27
    np.testing.assert_allclose(src.x_train[1, 0].numpy() * 255, images["train"][1].T, atol=1e-3)
    write_emnist(tmp_path / "d" / "raw", split="digits", n=11)
    with pytest.raises(DataError, match="emnist-digits-train-labels-idx1-ubyte: label 10 is outside 0..9"):
        emnist(CTX, root=str(tmp_path / "d"), split="digits")


def write_cifar100(folder, n=4, fine=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    for name in ("train", "test"):
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 b"fine_labels": list(fine or [0, 42, 99, 7][:n]), b"coarse_labels": [0, 5, 19, 3][:n]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar100_fine_and_coarse_labels(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    fine = cifar100(CTX, root=str(tmp_path))
    coarse = cifar100(CTX, root=str(tmp_path), labels="coarse")
    assert fine.num_classes == 100 and fine.y_train.tolist() == [0, 42, 99, 7]
    assert coarse.num_classes == 20 and coarse.y_train.tolist() == [0, 5, 19, 3]
    assert tuple(fine.x_train.shape) == (4, 3, 32, 32)


def test_cifar100_bad_label_and_missing_file_are_one_line(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python", fine=[0, 100, 1, 2])
    with pytest.raises(DataError, match="train: label 100 is outside 0..99"):
        cifar100(CTX, root=str(tmp_path))
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DataError, match="missing .*cifar-100-python/test: put CIFAR-100's python version"):
        cifar100(CTX, root=str(tmp_path))


# ------------------------------------------------------------------ image folder
def write_images(root, classes=("cat", "dog"), per_class=4, size=(10, 6)):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (255, 0, 0) if c == 0 else (0, 0, 255)
            Image.new("RGB", size, colour).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_resizes_and_labels_by_sorted_class_folders(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", per_class=1)
    src = image_folder(CTX, root=str(tmp_path), size=[8, 5])
    assert tuple(src.x_train.shape) == (8, 3, 8, 5) and src.info["classes"] == ["cat", "dog"]
    assert src.y_test.tolist() == [0, 1]
    assert src.x_train[src.y_train == 0][:, 0].mean() > 0.9 and src.x_train[src.y_train == 1][:, 2].mean() > 0.9
    gray = image_folder(CTX, root=str(tmp_path / "train"), size=[4, 4], color="gray")
    assert tuple(gray.x_train.shape) == (6, 1, 4, 4) and len(gray.y_test) == 2


def test_image_folder_unreadable_image_and_unknown_test_class_are_refused(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", classes=("cat", "cow"), per_class=1)
    with pytest.raises(DataError, match="class folder 'cow' is not among the training classes"):
        image_folder(CTX, root=str(tmp_path))
    (tmp_path / "train" / "dog" / "0.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="dog/0.jpg: not a readable image"):
        image_folder(CTX, root=str(tmp_path / "train"))
    with pytest.raises(DataError, match="no images in .*one sub-folder per class"):
        image_folder(CTX, root=str(tmp_path / "train" / "cat"))


# ------------------------------------------------------------------ every source through the CLI
def _npz(tmp):
    write_npz(tmp / "d.npz", n=48)
    return {"name": "npz", "path": str(tmp / "d.npz"), "user_key": "user", "num_clients": "all", "partition": "natural"}


def _csv(tmp):
    write_csv(tmp / "t.csv", rows=40)
    return {"name": "csv", "path": str(tmp / "t.csv"), "label_column": "species", "user_column": "user",
            "num_clients": "all"}


def _fashion(tmp):
    write_mnist(tmp / "FashionMNIST" / "raw", n_train=16, n_test=4)
    return {"name": "fashion_mnist", "root": str(tmp), "num_clients": 4}


def _kmnist(tmp):
    write_mnist(tmp / "KMNIST" / "raw", n_train=16, n_test=4)
    return {"name": "kmnist", "root": str(tmp), "num_clients": 4}


def _emnist(tmp):
    write_emnist(tmp / "EMNIST" / "raw", split="letters", n=16)
    return {"name": "emnist", "root": str(tmp), "split": "letters", "num_clients": 4}


def _cifar100(tmp):
    write_cifar100(tmp / "cifar-100-python")
    return {"name": "cifar100", "root": str(tmp), "labels": "coarse", "num_clients": 2, "partition": "iid"}


def _images(tmp):
    write_images(tmp / "imgs", per_class=6)
    return {"name": "image_folder", "root": str(tmp / "imgs"), "size": [6, 6], "num_clients": 2}


@pytest.mark.parametrize("make", [_npz, _csv, _fashion, _kmnist, _emnist, _cifar100, _images])
def test_cli_runs_on_each_source(tmp_path, tmp_yaml, capsys, make):
    from fedsim.cli import main

    data = make(tmp_path)
    cfg = tmp_yaml({**digits_config(run={"rounds": 2, "eval_every": 1}), "data": data,
                    "model": {"name": "mlp", "hidden": [8]}, "protocol": {"name": "sync", "clients_per_round": 2}})
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 <= r["test_accuracy"] <= 1 for r in rows)
    if data.get("num_clients") == "all":  # users with their own test rows: per-client columns
        assert "client_acc_mean" in rows[-1]


def test_digits_read_from_scikit_learns_file_equal_its_loader():
    from sklearn.datasets import load_digits

    from fedsim.data.sources import digits_arrays

    images, target = digits_arrays()
    bunch = load_digits()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert target.dtype == np.int64 and np.array_equal(target, bunch.target)


def test_digits_do_not_import_scikit_learn():
    code = ("import sys; from fedsim.data.sources import digits_arrays; digits_arrays(); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
