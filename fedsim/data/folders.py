"""MNIST-like and CIFAR datasets read from a local folder in their standard on-disk formats.

Nothing is downloaded. A missing or malformed folder raises DataError saying what to put
where. MNIST, Fashion-MNIST, KMNIST, EMNIST: IDX files (optionally .gz), directly in the
folder, in raw/, or in torchvision's <root>/<NAME>/raw. CIFAR-10: the binary version
(``cifar-10-batches-bin/*.bin``) or the Python version (``cifar-10-batches-py``); CIFAR-100:
the Python version (``cifar-100-python``); python batches are read with a restricted
unpickler that accepts only plain arrays and containers. All are held in memory.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

from typing import Annotated, List, Literal, Optional

import numpy as np
import torch

from ..config import Each, Range
from ..errors import DataError
from ..registry import DATA_SOURCES
from .base import SourceContext, SourceData

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
MNIST_FOLDERS = (".", "raw", "MNIST/raw")  # the files themselves, a raw/ folder, torchvision's root
MNIST_HINT = (
    "put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) in {root}, {root}/raw or "
    "{root}/MNIST/raw (torchvision's layout) — e.g. from https://yann.lecun.com/exdb/mnist/ or any MNIST mirror"
)
CIFAR_HINT = (
    "put CIFAR-10 in {root}: either cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin) "
    "or cifar-10-batches-py/ (data_batch_1..5, test_batch; torchvision's layout), extracted from "
    "https://www.cs.toronto.edu/~kriz/cifar.html"
)
NUM_CLASSES = 10  # MNIST and CIFAR-10


def _open_maybe_gz(root: Path, name: str, hint: str, folders: tuple[str, ...] = MNIST_FOLDERS) -> tuple[Path, bytes]:
    """Returns (path, contents) of file `name` (or name.gz, decompressed) in one of `folders` under `root`."""
    for folder in folders:
        for candidate in (root / folder / name, root / folder / f"{name}.gz"):
            if candidate.is_file():
                raw = candidate.read_bytes()
                if candidate.suffix == ".gz":
                    try:
                        raw = gzip.decompress(raw)
                    except (OSError, EOFError) as exc:
                        raise DataError(f"{candidate}: not a valid gzip file ({exc})") from None
                return candidate, raw
    raise DataError(f"missing {name} in {root}: {hint.format(root=root)}")


def check_labels(labels: np.ndarray, where: Path, num_classes: int = NUM_CLASSES) -> None:
    """Raises DataError naming `where` and the first bad value unless every label is a class
    index in [0, num_classes)."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} is outside 0..{num_classes - 1} "
                        f"({bad.size} of {labels.size} labels are)")


def read_idx(raw: bytes, name: str) -> np.ndarray:
    """Parses an IDX file (the MNIST format) into a uint8 array; raises DataError if malformed."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{name}: IDX body has {len(raw) - header} bytes, header says {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_source(root: str, what: str, files: dict[str, str], folders: tuple[str, ...], hint: str, num_classes: int,
               transpose: bool = False) -> SourceData:
    """Returns the SourceData of four IDX files (train/test images and labels, optionally .gz)
    found in one of `folders` under `root`; images scaled to [0, 1] and shaped [1, H, W]
    (`transpose`: H and W swapped, as EMNIST's files store them). Raises DataError naming the
    file and the expected layout when one is missing or malformed."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{what} folder {base} does not exist: {hint.format(root=base)}")
    found = {k: _open_maybe_gz(base, f, hint, folders) for k, f in files.items()}
    arrays = {k: read_idx(raw, str(path)) for k, (path, raw) in found.items()}
    for split in ("train", "test"):
        xs, ys = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if xs.ndim != 3 or ys.ndim != 1 or len(xs) != len(ys):
            raise DataError(f"{what} {split}: images {xs.shape} and labels {ys.shape} do not match "
                            f"({found[f'{split}_x'][0]}, {found[f'{split}_y'][0]})")
        check_labels(ys, found[f"{split}_y"][0], num_classes)

    def to_x(a: np.ndarray) -> torch.Tensor:
        x = torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0
        return x.transpose(2, 3).contiguous() if transpose else x

    to_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return SourceData(to_x(arrays["train_x"]), to_y(arrays["train_y"]), to_x(arrays["test_x"]), to_y(arrays["test_y"]),
                      num_classes=num_classes)


@DATA_SOURCES.register("mnist")
def mnist(ctx: SourceContext, root: str = "data/mnist") -> SourceData:
    """MNIST from local IDX files; images scaled to [0, 1] and shaped [1, 28, 28].

    Args:
        root: Folder holding the four IDX files, or a raw/ or MNIST/raw/ (torchvision's layout) folder with them.
    """
    return idx_source(root, "MNIST", MNIST_FILES, MNIST_FOLDERS, MNIST_HINT, NUM_CLASSES)


def _mnist_like(name: str) -> tuple[tuple[str, ...], str]:
    """Returns (folders, hint) for a dataset stored like MNIST under torchvision's root/<name>/raw."""
    hint = MNIST_HINT.replace("MNIST IDX", f"{name} IDX").replace("MNIST/raw", f"{name}/raw").split(" — ")[0]
    return (".", "raw", f"{name}/raw"), hint


@DATA_SOURCES.register("fashion_mnist")
def fashion_mnist(ctx: SourceContext, root: str = "data/fashion_mnist") -> SourceData:
    """Fashion-MNIST from local IDX files (MNIST's file names); images [1, 28, 28] in [0, 1], 10 classes.

    Args:
        root: Folder holding the four IDX files, or a raw/ or FashionMNIST/raw/ (torchvision's layout) folder with them.
    """
    folders, hint = _mnist_like("FashionMNIST")
    return idx_source(root, "Fashion-MNIST", MNIST_FILES, folders, hint, 10)


@DATA_SOURCES.register("kmnist")
def kmnist(ctx: SourceContext, root: str = "data/kmnist") -> SourceData:
    """Kuzushiji-MNIST from local IDX files (MNIST's file names); images [1, 28, 28] in [0, 1], 10 classes.

    Args:
        root: Folder holding the four IDX files, or a raw/ or KMNIST/raw/ (torchvision's layout) folder with them.
    """
    folders, hint = _mnist_like("KMNIST")
    return idx_source(root, "KMNIST", MNIST_FILES, folders, hint, 10)


EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 27, "digits": 10, "mnist": 10}


@DATA_SOURCES.register("emnist")
def emnist(
    ctx: SourceContext,
    root: str = "data/emnist",
    split: Literal["byclass", "bymerge", "balanced", "letters", "digits", "mnist"] = "balanced",
) -> SourceData:
    """EMNIST from local IDX files (emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]).

    Images are transposed into the usual orientation, as torchvision does: [1, 28, 28] in
    [0, 1]. Classes: byclass 62, bymerge and balanced 47, digits and mnist 10, letters 27
    (labels 1..26; 0 unused, as in torchvision).

    Args:
        root: Folder holding the split's IDX files, or a raw/ or EMNIST/raw/ (torchvision's layout) folder with them.
        split: Which EMNIST split to read.
    """
    files = {"train_x": f"emnist-{split}-train-images-idx3-ubyte", "train_y": f"emnist-{split}-train-labels-idx1-ubyte",
             "test_x": f"emnist-{split}-test-images-idx3-ubyte", "test_y": f"emnist-{split}-test-labels-idx1-ubyte"}
    hint = (f"put the four EMNIST {split} IDX files ({', '.join(files.values())}, optionally .gz) in {{root}}, "
            "{root}/raw or {root}/EMNIST/raw (torchvision's layout; the 'gzip.zip' archive of the EMNIST site, unzipped)")
    return idx_source(root, "EMNIST", files, (".", "raw", "EMNIST/raw", "gzip"), hint, EMNIST_CLASSES[split], transpose=True)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers (CIFAR batches)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_py_batch(path: Path, label_key: str = "labels", num_classes: int = NUM_CLASSES,
                    what: str = "CIFAR-10") -> tuple[np.ndarray, np.ndarray]:
    """Returns (images [n, 3, 32, 32] uint8, labels) of a CIFAR python batch, labels from
    `label_key`; raises DataError naming `path` for anything but plain arrays of that shape."""
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a {what} python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a {what} python batch (top level is {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key.encode(), batch.get(label_key))
    if data is None or labels is None:
        raise DataError(f"{path}: {what} batch without 'data' and {label_key!r}")
    try:
        data = np.asarray(data)
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: 'data' and {label_key!r} are not arrays ({exc})") from None
    if data.dtype.kind not in "iu" or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DataError(f"{path}: expected integer data [n, 3072] and n labels, got {data.dtype} {list(data.shape)} "
                        f"and {list(labels.shape)}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: pixel values must be 0..255, got {data.min()}..{data.max()}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers, got {labels.dtype}")
    check_labels(labels, path, num_classes)
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(f"{path}: size {raw.size} is not a multiple of 3073 (1 label byte + 3072 pixels)")
    rows = raw.reshape(-1, 3073)
    labels = rows[:, 0].astype(np.int64)
    check_labels(labels, path)
    return rows[:, 1:].reshape(-1, 3, 32, 32), labels


@DATA_SOURCES.register("cifar10")
def cifar10(
    ctx: SourceContext,
    root: str = "data/cifar10",
    batches: Annotated[Optional[List[int]], Each(Range(1, 5))] = None,
) -> SourceData:
    """CIFAR-10 from a local folder (binary or python version); images [3, 32, 32] in [0, 1].

    Args:
        root: Folder holding cifar-10-batches-bin/ or cifar-10-batches-py/ (or their files directly).
        batches: Training batches to read (N of data_batch_N, 1..5); default all five, and a folder
            that lacks any of them is refused rather than trained on in part.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"CIFAR-10 folder {base} does not exist: {CIFAR_HINT.format(root=base)}")
    wanted = sorted(set(batches)) if batches is not None else [1, 2, 3, 4, 5]
    if batches is not None and (not batches or len(wanted) != len(batches)):
        raise ValueError(f"batches: give each of 1..5 at most once, and at least one (got {batches})")
    for sub, ext, reader in (("cifar-10-batches-bin", ".bin", _cifar_bin_batch), ("cifar-10-batches-py", "", _cifar_py_batch)):
        for folder in (base / sub, base):
            train_files = [folder / f"data_batch_{i}{ext}" for i in wanted]
            test_file = folder / f"test_batch{ext}"
            present = [f for f in train_files if f.is_file()]
            if present and test_file.is_file():
                if len(present) < len(train_files):
                    missing = ", ".join(f.name for f in train_files if not f.is_file())
                    raise DataError(f"{folder}: {missing} missing; put all of data_batch_1..5 there, or list the "
                                    "ones to use in data.batches (e.g. batches: [1, 2])")
                tr = [reader(f) for f in present]
                xte, yte = reader(test_file)
                xtr = np.concatenate([t[0] for t in tr])
                ytr = np.concatenate([t[1] for t in tr])
                to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 255.0  # noqa: E731
                return SourceData(to_x(xtr), torch.tensor(ytr), to_x(xte), torch.tensor(yte), num_classes=10)
    raise DataError(f"no CIFAR-10 batches found in {base}: {CIFAR_HINT.format(root=base)}")


CIFAR100_HINT = (
    "put CIFAR-100's python version in {root}: cifar-100-python/ with its train and test files "
    "(torchvision's layout), extracted from https://www.cs.toronto.edu/~kriz/cifar.html"
)


@DATA_SOURCES.register("cifar100")
def cifar100(
    ctx: SourceContext,
    root: str = "data/cifar100",
    labels: Literal["fine", "coarse"] = "fine",
) -> SourceData:
    """CIFAR-100 from its python version (cifar-100-python/train, test); images [3, 32, 32] in [0, 1].

    Read with the same restricted unpickler as CIFAR-10 (plain arrays and containers only).

    Args:
        root: Folder holding cifar-100-python/ (or its train and test files directly).
        labels: 'fine' (100 classes) or 'coarse' (the 20 superclasses).
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"CIFAR-100 folder {base} does not exist: {CIFAR100_HINT.format(root=base)}")
    key, classes = ("fine_labels", 100) if labels == "fine" else ("coarse_labels", 20)
    for folder in (base / "cifar-100-python", base):
        train, test = folder / "train", folder / "test"
        if train.is_file() and test.is_file():
            xtr, ytr = _cifar_py_batch(train, key, classes, "CIFAR-100")
            xte, yte = _cifar_py_batch(test, key, classes, "CIFAR-100")
            to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 255.0  # noqa: E731
            return SourceData(to_x(xtr), torch.tensor(ytr), to_x(xte), torch.tensor(yte), num_classes=classes)
        if train.is_file() or test.is_file():
            missing = test if train.is_file() else train
            raise DataError(f"missing {missing}: {CIFAR100_HINT.format(root=base)}")
    raise DataError(f"no CIFAR-100 files found in {base}: {CIFAR100_HINT.format(root=base)}")


__all__ = ["cifar10", "cifar100", "emnist", "fashion_mnist", "idx_source", "kmnist", "mnist", "read_idx"]
