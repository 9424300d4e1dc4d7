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
