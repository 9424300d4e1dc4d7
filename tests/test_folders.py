"""MNIST (IDX) and CIFAR-10 (binary and python) folder loaders on tiny generated files."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from fedsim.data.base import SourceContext
from fedsim.data.folders import cifar10, mnist
from fedsim.errors import DataError

CTX = SourceContext(num_clients=2, seed=0, test_fraction=0.2)


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root, n_train=6, n_test=3, gz=False):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in files.items():
        data = idx_bytes(np.asarray(arr))
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx(tmp_path, gz):
    files = write_mnist(tmp_path / "mnist", gz=gz)
    src = mnist(CTX, root=str(tmp_path / "mnist"))
    assert tuple(src.x_train.shape) == (6, 1, 28, 28)
    assert src.x_train.max() <= 1.0
    assert np.array_equal(src.y_train.numpy(), files["train-labels-idx1-ubyte"])
    assert np.allclose(src.x_test.numpy()[:, 0] * 255, files["t10k-images-idx3-ubyte"], atol=1e-3)


def test_mnist_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        mnist(CTX, root=str(tmp_path / "nowhere"))


def test_mnist_rejects_non_idx(tmp_path):
    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "train-labels-idx1-ubyte").write_bytes(b"hello world, not idx")
    with pytest.raises(DataError, match="bad magic"):
        mnist(CTX, root=str(tmp_path / "m"))


def test_mnist_rejects_truncated(tmp_path):
    write_mnist(tmp_path / "m")
    p = tmp_path / "m" / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="header says"):
        mnist(CTX, root=str(tmp_path / "m"))


def test_cifar_binary(tmp_path):
    d = tmp_path / "c" / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [*[(f"data_batch_{i}.bin", 2) for i in range(1, 6)], ("test_batch.bin", 3)]:
        rows = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1)
        (d / name).write_bytes(rows.astype(np.uint8).tobytes())
    src = cifar10(CTX, root=str(tmp_path / "c"))
    assert tuple(src.x_train.shape) == (10, 3, 32, 32)
    assert tuple(src.x_test.shape) == (3, 3, 32, 32)


def test_cifar_python_pickle(tmp_path):
    d = tmp_path / "c" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [1, 2, 3, 4]}
        (d / name).write_bytes(pickle.dumps(batch))
    src = cifar10(CTX, root=str(tmp_path / "c"))
    assert tuple(src.x_train.shape) == (20, 3, 32, 32)
    assert src.y_test.tolist() == [1, 2, 3, 4]


def test_cifar_refuses_malicious_pickle(tmp_path):
    d = tmp_path / "c" / "cifar-10-batches-py"
    d.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
        (d / name).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing"):
        cifar10(CTX, root=str(tmp_path / "c"))


def test_cifar_missing_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-bin"):
        cifar10(CTX, root=str(tmp_path / "empty"))


def test_mnist_in_torchvisions_layout(tmp_path):
    files = write_mnist(tmp_path / "data" / "MNIST" / "raw", gz=True)
    src = mnist(CTX, root=str(tmp_path / "data"))
    assert np.array_equal(src.y_train.numpy(), files["train-labels-idx1-ubyte"])


def test_mnist_missing_names_every_layout(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="MNIST/raw"):
        mnist(CTX, root=str(tmp_path / "data"))


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_mnist_label_outside_classes_is_refused_naming_file_and_value(tmp_path, split):
    write_mnist(tmp_path / "m")
    labels = np.arange(6 if split == "train" else 3) % 10
    labels[1] = 12
    (tmp_path / "m" / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match=f"{split}-labels-idx1-ubyte: label 12 is outside 0..9"):
        mnist(CTX, root=str(tmp_path / "m"))


def write_cifar_py(folder, batches=range(1, 6), labels=(1, 2, 3, 4), test_labels=(1, 2, 3, 4)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name, lab in [*[(f"data_batch_{i}", labels) for i in batches], ("test_batch", test_labels)]:
        batch = {b"data": rng.integers(0, 256, (len(lab), 3072)).astype(np.uint8), b"labels": list(lab)}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("labels,bad", [((1, 10, 3, 4), 10), ((1, 2, -1, 4), -1)])
def test_cifar_python_label_outside_classes_is_refused(tmp_path, labels, bad):
    write_cifar_py(tmp_path / "c" / "cifar-10-batches-py", test_labels=labels)
    with pytest.raises(DataError, match=f"test_batch: label {bad} is outside 0..9"):
        cifar10(CTX, root=str(tmp_path / "c"))


def test_cifar_python_labels_that_are_not_integers_are_refused(tmp_path):
    write_cifar_py(tmp_path / "c" / "cifar-10-batches-py", labels=("a", "b", "c", "d"))
    with pytest.raises(DataError, match="data_batch_1: labels must be integers"):
        cifar10(CTX, root=str(tmp_path / "c"))


def test_cifar_with_some_training_batches_is_refused_unless_listed(tmp_path):
    write_cifar_py(tmp_path / "c" / "cifar-10-batches-py", batches=(1, 3))
    with pytest.raises(DataError, match="data_batch_2, data_batch_4, data_batch_5 missing"):
        cifar10(CTX, root=str(tmp_path / "c"))
    src = cifar10(CTX, root=str(tmp_path / "c"), batches=[1, 3])
    assert tuple(src.x_train.shape) == (8, 3, 32, 32)
    with pytest.raises(DataError, match="data_batch_2 missing"):
        cifar10(CTX, root=str(tmp_path / "c"), batches=[1, 2])


def test_a_bad_data_folder_is_one_line_before_any_file(tmp_path, tmp_yaml, capsys):
    from fedsim.cli import main

    from .conftest import digits_config

    write_cifar_py(tmp_path / "c" / "cifar-10-batches-py", batches=(1,))
    cfg = tmp_yaml({**digits_config(run={"rounds": 1}), "data": {"name": "cifar10", "root": str(tmp_path / "c"),
                                                                 "num_clients": 4}})
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data_batch_2" in err, err
    assert not (tmp_path / "run").exists()
